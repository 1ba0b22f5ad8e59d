"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file the pipeline writes (weights, configs, pseudo-labels, metrics, reports, figures) goes through
:func:`atomic_path`: the content is written to a temporary file beside the destination (same file
system), flushed to disk, then renamed onto the destination. A crash or a full disk leaves the previous
file intact and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_json", "atomic_write_text", "fsync_dir", "fsync_file", "link_or_copy"]


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file's content to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename inside it) to disk, where the file system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed onto ``path`` when the block succeeds.

    Parent folders are created. On an exception the temporary file is removed and ``path`` keeps its old
    content. ``suffix`` ends the temporary name (e.g. ``".tmp.png"`` for writers that infer the format).

    Example::

        with atomic_path(run / "model.safetensors") as tmp:
            safetensors.torch.save_model(model, str(tmp), force_contiguous=True)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{suffix}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], data: Any, **dumps_kwargs: Any) -> Path:
    """Write ``json.dumps(data, **dumps_kwargs)`` to ``path`` atomically; returns ``path``."""
    return atomic_write_text(path, json.dumps(data, **dumps_kwargs))


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (copy across file systems); an existing ``target`` is replaced."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    tmp.replace(target)
