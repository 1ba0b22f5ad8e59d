"""Atomic, safely loadable checkpoints: weights as safetensors, training state for ``weights_only`` loading.

Layout of a checkpoint folder (``run_dir/checkpoints``)::

    step_00000100/model.safetensors   model weights (safetensors; shared tensors handled)
    step_00000100/state.pt            training state: optimizer, scheduler, RNG states, data order,
                                      step, extra state (e.g. a memory bank), metrics so far
    latest                            the name of the newest complete checkpoint (written last)

Writing is crash-safe: both files are written into a temporary folder (each file to a temporary
name, flushed and ``fsync``-ed, then renamed), the folder is renamed to ``step_<step>``, and only
then is ``latest`` replaced atomically. A process killed at any point therefore leaves ``latest``
naming the previous complete checkpoint, which is what :func:`load_checkpoint` loads; a
checkpoint whose files turn out unreadable is skipped in favour of the next older one, with a
warning. Older checkpoints beyond ``keep`` are deleted only after the pointer moved on.

The state file is read with ``torch.load(weights_only=True)``, so only tensors, containers and
plain scalars can be in it (:func:`save_checkpoint` checks this before writing; pickled arbitrary
objects are refused on load). RNG states of numpy and Python are stored as tensors and numbers
(:func:`capture_rng_state` / :func:`restore_rng_state`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import re
import shutil
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from .atomic import atomic_path, fsync_dir, fsync_file
from .errors import UserError

__all__ = [
    "POINTER_NAME",
    "STATE_NAME",
    "WEIGHTS_NAME",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "capture_rng_state",
    "check_writable",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_state",
    "load_weights",
    "restore_rng_state",
    "save_checkpoint",
    "save_weights",
]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
STATE_NAME = "state.pt"
POINTER_NAME = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """Base class of checkpoint errors (messages name the file involved)."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file exists but cannot be read (truncated, not a checkpoint, unsafe pickle)."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint belongs to another model / optimizer layout (names the file and the keys)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint or run directory cannot be written (read-only, full disk, path under a file)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint on disk.

    Attributes:
        directory: the ``step_<step>`` folder.
        step: the optimizer step it was taken after.
    """

    directory: Path
    step: int

    @property
    def weights(self) -> Path:
        """The safetensors weights file."""
        return self.directory / WEIGHTS_NAME

    @property
    def state(self) -> Path:
        """The training-state file."""
        return self.directory / STATE_NAME


# ----------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict[str, Any]:
    """The RNG states of torch (CPU and initialized CUDA devices), numpy's global RNG and ``random``.

    Returns:
        A mapping of tensors and plain numbers only, loadable with ``torch.load(weights_only=True)``.
    """
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    py_version, py_state, py_gauss = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(cuda),
        "numpy": {
            "bit_generator": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),  # (624,)
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),  # (625,)
            "gauss_next": None if py_gauss is None else float(py_gauss),
        },
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNG states captured by :func:`capture_rng_state`.

    Args:
        state: the captured mapping.

    Raises:
        ValueError: if a part is missing or malformed.
    """
    try:
        torch.set_rng_state(state["torch"])
        cuda = list(state["cuda"])
        if cuda and torch.cuda.is_available():
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
            else:
                logger.warning(
                    "checkpoint has %d CUDA RNG states for %d devices; not restored",
                    len(cuda),
                    torch.cuda.device_count(),
                )
        np_state = state["numpy"]
        np.random.set_state(
            (
                np_state["bit_generator"],
                np_state["keys"].numpy().astype(np.uint32),
                int(np_state["pos"]),
                int(np_state["has_gauss"]),
                float(np_state["cached_gaussian"]),
            )
        )
        py_state = state["python"]
        random.setstate(
            (int(py_state["version"]), tuple(int(v) for v in py_state["state"].tolist()), py_state["gauss_next"])
        )
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"malformed RNG state in checkpoint: {error!r}") from error


# ----------------------------------------------------------------------------- writing

_ALLOWED_SCALARS = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.Size)


def _check_weights_only(value: Any, where: str) -> None:
    """Refuse, before writing, anything ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(value, (torch.Tensor, _ALLOWED_SCALARS)):
        return
    if type(value) in (list, tuple):  # exact types: namedtuples / subclasses are not weights_only-loadable
        for i, item in enumerate(value):
            _check_weights_only(item, f"{where}[{i}]")
        return
    if type(value) in (dict, OrderedDict, Counter):  # what torch's weights_only unpickler accepts
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"training state key {where}[{key!r}] must be a str or int, got {type(key).__name__}")
            _check_weights_only(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"training state entry {where} is a {type(value).__name__}; only tensors, dicts, lists, tuples, "
        "numbers, strings and None can be stored (the state file is loaded with weights_only=True)"
    )


def _describe(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "no space left on the device"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied / read-only file system"
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a path component is a file, not a folder"
    return error.strerror or repr(error)


def check_writable(directory: str | os.PathLike[str]) -> Path:
    """Create ``directory`` if needed and check a file can be written and renamed there.

    Args:
        directory: the folder.

    Returns:
        The folder as a :class:`~pathlib.Path`.

    Raises:
        CheckpointWriteError: naming the folder and the reason, if it cannot be used.
    """
    directory = Path(directory)
    probe = directory / f".write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        os.replace(probe, probe.with_suffix(".done"))
        probe.with_suffix(".done").unlink()
    except OSError as error:
        raise CheckpointWriteError(
            f"run directory {directory} is not writable: {_describe(error)} ({error})"
        ) from error
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    return directory


def _write_pointer(checkpoint_dir: Path, name: str) -> None:
    pointer = checkpoint_dir / POINTER_NAME
    tmp = checkpoint_dir / f".{POINTER_NAME}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(name + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, pointer)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(checkpoint_dir)


def save_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    state: Mapping[str, Any],
    keep: int = 2,
) -> CheckpointInfo:
    """Write one checkpoint atomically and move the ``latest`` pointer to it.

    Args:
        checkpoint_dir: the folder holding the ``step_*`` checkpoints (created).
        step: the optimizer step just completed.
        model: the model whose ``state_dict`` goes to ``model.safetensors``.
        state: the training state (tensors, containers, plain scalars only).
        keep: how many newest checkpoints to keep; older ones are deleted after the pointer moved.

    Returns:
        The written checkpoint.

    Raises:
        TypeError: if ``state`` holds something ``weights_only`` loading would refuse.
        ValueError: if ``step`` < 0 or ``keep`` < 1.
        CheckpointWriteError: if writing fails (read-only folder, full disk); temporary files are
            removed and the previous checkpoint and pointer are left untouched.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    _check_weights_only(dict(state), "state")
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / f"step_{step:08d}"
    tmp_dir = checkpoint_dir / f".step_{step:08d}.{os.getpid()}.tmp"
    try:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
        weights_tmp = tmp_dir / f".{WEIGHTS_NAME}.tmp"
        save_model(model, str(weights_tmp), metadata={"step": str(step)}, force_contiguous=True)
        fsync_file(weights_tmp)
        os.replace(weights_tmp, tmp_dir / WEIGHTS_NAME)
        state_tmp = tmp_dir / f".{STATE_NAME}.tmp"
        with open(state_tmp, "wb") as handle:
            torch.save(dict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(state_tmp, tmp_dir / STATE_NAME)
        fsync_dir(tmp_dir)
        if final.exists():  # left by a run killed before its pointer moved: never the pointer target
            trash = checkpoint_dir / f".trash_{final.name}.{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp_dir, final)
        fsync_dir(checkpoint_dir)
        _write_pointer(checkpoint_dir, final.name)
    except OSError as error:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        previous = latest_checkpoint(checkpoint_dir) if checkpoint_dir.is_dir() else None
        kept = f"the previous checkpoint {previous.directory} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"cannot write checkpoint {final}: {_describe(error)} ({error}); {kept}") from error
    _prune(checkpoint_dir, keep, final)
    return CheckpointInfo(final, step)


def _prune(checkpoint_dir: Path, keep: int, current: Path) -> None:
    for info in list_checkpoints(checkpoint_dir)[:-keep]:
        if info.directory != current:
            shutil.rmtree(info.directory, ignore_errors=True)
    for stale in checkpoint_dir.glob(".step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------- reading


def list_checkpoints(checkpoint_dir: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Complete checkpoints (renamed ``step_*`` folders holding both files), oldest first.

    Args:
        checkpoint_dir: the checkpoint folder (may not exist).

    Returns:
        The checkpoints sorted by step.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for child in checkpoint_dir.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / WEIGHTS_NAME).is_file() and (child / STATE_NAME).is_file():
            found.append(CheckpointInfo(child, int(match.group(1))))
    return sorted(found, key=lambda info: info.step)


def latest_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> CheckpointInfo | None:
    """The checkpoint named by the ``latest`` pointer (or, if it is gone, the newest complete one).

    Args:
        checkpoint_dir: the checkpoint folder.

    Returns:
        The checkpoint, or ``None`` when there is none.
    """
    checkpoint_dir = Path(checkpoint_dir)
    complete = list_checkpoints(checkpoint_dir)
    pointer = checkpoint_dir / POINTER_NAME
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        for info in complete:
            if info.directory.name == name:
                return info
        logger.warning("checkpoint pointer %s names %r, which is missing or incomplete", pointer, name)
        return None if not complete else complete[-1]
    return None


def _candidates(checkpoint_dir: Path) -> list[CheckpointInfo]:
    """The pointer's checkpoint first, then older complete ones, newest first."""
    latest = latest_checkpoint(checkpoint_dir)
    if latest is None:
        return []
    older = [info for info in reversed(list_checkpoints(checkpoint_dir)) if info.step < latest.step]
    return [latest, *older]


def _shared_groups(model: nn.Module) -> dict[str, set[str]]:
    """For each state-dict key, the keys whose tensor shares its storage (tied weights)."""
    groups: dict[tuple[int, int], set[str]] = {}
    state = model.state_dict()
    for key, tensor in state.items():
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        groups.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset()), set()).add(key)
    result: dict[str, set[str]] = {}
    for keys in groups.values():
        for key in keys:
            result[key] = keys
    return result


def save_weights(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model``'s weights to a safetensors file atomically (temporary file, fsync, rename).

    Raises:
        CheckpointWriteError: if the file cannot be written; an existing file at ``path`` is left intact.
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            save_model(model, str(tmp), force_contiguous=True)
    except OSError as error:
        raise CheckpointWriteError(f"cannot write weights {path}: {_describe(error)} ({error})") from error
    return path


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load ``model.safetensors`` into ``model`` after checking every key and shape.

    Args:
        model: the model (unwrapped from DDP).
        path: the safetensors file.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointCorruptError: if the file is not a readable safetensors file.
        CheckpointMismatchError: naming the file and the missing / unexpected / mis-shaped keys, if it
            was saved from another model; ``model`` is left unchanged.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointCorruptError(f"cannot read checkpoint weights {path}: {error}") from error
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    shared = _shared_groups(model)
    unexpected = sorted(set(shapes) - set(expected))
    missing = sorted(k for k in set(expected) - set(shapes) if not (shared.get(k, {k}) & set(shapes)))
    wrong = sorted(
        f"{k}: file {shapes[k]} vs model {expected[k]}" for k in set(shapes) & set(expected) if shapes[k] != expected[k]
    )
    if unexpected or missing or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {_clip(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_clip(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches {_clip(wrong)}")
        raise CheckpointMismatchError(
            f"checkpoint {path} was saved from a different model ({type(model).__name__}): " + "; ".join(parts)
        )
    load_model(model, str(path), strict=True)


def _clip(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)} in all)"


def load_state(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training-state file with ``torch.load(weights_only=True)``.

    Args:
        path: the ``state.pt`` file.
        map_location: where to put its tensors.

    Returns:
        The state mapping.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointCorruptError: if it is truncated, not a state file, or holds pickled objects that
            ``weights_only`` loading refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint state not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ... on bad files
        raise CheckpointCorruptError(
            f"cannot load training state {path} safely (weights_only=True): {type(error).__name__}: {error}"
        ) from error
    if not isinstance(state, dict):
        raise CheckpointCorruptError(f"training state {path} holds a {type(state).__name__}, not a dict")
    return state


def load_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    model: nn.Module,
    map_location: str | torch.device = "cpu",
) -> tuple[CheckpointInfo, dict[str, Any]] | None:
    """Load the newest readable checkpoint into ``model`` and return its training state.

    The pointer's checkpoint is tried first; if one of its files cannot be read it is skipped with
    a warning and the next older complete checkpoint is tried.

    Args:
        checkpoint_dir: the checkpoint folder.
        model: the model to load the weights into (unwrapped from DDP).
        map_location: where to put the state's tensors.

    Returns:
        ``(checkpoint, state)``, or ``None`` when there is no checkpoint.

    Raises:
        CheckpointMismatchError: if a checkpoint belongs to another model.
        CheckpointCorruptError: if checkpoints exist but none can be read.
    """
    candidates = _candidates(Path(checkpoint_dir))
    failures = []
    for info in candidates:
        try:
            state = load_state(info.state, map_location)
            load_weights(model, info.weights)
        except CheckpointCorruptError as error:
            logger.warning("skipping unreadable checkpoint %s: %s", info.directory, error)
            failures.append(str(error))
            continue
        return info, state
    if failures:
        raise CheckpointCorruptError(f"no readable checkpoint in {checkpoint_dir}: " + " | ".join(failures))
    return None
