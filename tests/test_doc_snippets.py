"""Every Python snippet of the README and of the Sphinx pages runs as written.

The Python blocks of a page (``.. code-block:: python`` in ``docs/*.rst``, fenced ``python`` blocks in
``README.md``) run in order in one namespace, so a later block may use the names of an earlier one, the
way a reader types them into one session. They run from a scratch folder that looks like the
repository root (``configs/`` is linked there), so a snippet that reads ``configs/demo.yaml`` or writes
``runs/...`` works exactly as it would from a checkout without touching the checkout. A traceback
names the page and its line.
"""

from __future__ import annotations

import io
import os
import re
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A page's blocks run on one CPU thread with tiny sizes; this is the ceiling of CPU time (not wall time,
# which other processes on a shared machine inflate) a page must stay under, its first imports included.
PAGE_CPU_SECONDS = 30.0

_RST_DIRECTIVE = re.compile(
    r"^(?P<indent>[ \t]*)\.\. (?:code-block|code|sourcecode)::[ \t]*(?:python|py|python3)[ \t]*$"
)
_MD_FENCE = re.compile(r"^(?P<indent>[ \t]*)```[ \t]*(?:python|py|python3)[ \t]*$")


@dataclass(frozen=True)
class Block:
    """One Python snippet: its text (dedented) and the 1-based line of the page where it starts."""

    code: str
    line: int


def rst_blocks(text: str) -> list[Block]:
    """The ``.. code-block:: python`` bodies of a reStructuredText page, in page order."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = _RST_DIRECTIVE.match(lines[i])
        i += 1
        if not match:
            continue
        indent = len(match["indent"].expandtabs())
        # directive options (":linenos:", ...) directly below the directive
        while i < len(lines) and lines[i].strip().startswith(":") and _indent(lines[i]) > indent:
            i += 1
        body: list[str] = []
        start = None
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
            if lines[i].strip() and start is None:
                start = i + 1
            if start is not None:
                body.append(lines[i])
            i += 1
        code = textwrap.dedent("\n".join(body)).strip("\n")
        if code:
            blocks.append(Block(code + "\n", start))
    return blocks


def markdown_blocks(text: str) -> list[Block]:
    """The fenced ```` ```python ```` bodies of a Markdown page, in page order."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = _MD_FENCE.match(lines[i])
        i += 1
        if not match:
            continue
        start = i + 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"unclosed ```python block starting at line {start - 1}")
        i += 1
        blocks.append(Block(textwrap.dedent("\n".join(body)) + "\n", start))
    return blocks


def _indent(line: str) -> int:
    return len(line.expandtabs()) - len(line.expandtabs().lstrip())


def page_blocks(page: str) -> list[Block]:
    text = (ROOT / page).read_text()
    return markdown_blocks(text) if page.endswith(".md") else rst_blocks(text)


# Pages whose snippets need what their commands produced; their own test runs commands and snippets in order.
RUN_ELSEWHERE = {"docs/your_own_data.rst": "tests/pipeline/test_your_own_data_page.py"}


def _pages() -> list[str]:
    candidates = ["README.md", *(p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "docs").glob("*.rst")))]
    return [page for page in candidates if page_blocks(page) and page not in RUN_ELSEWHERE]


PAGES = _pages()


def run_page(page: str) -> dict:
    """Run the Python blocks of ``page`` in order in one namespace (from the current directory)."""
    namespace: dict = {"__name__": "__main__"}
    for block in page_blocks(page):
        # pad so that a traceback's line number is the line of the page
        source = "\n" * (block.line - 1) + block.code
        exec(compile(source, str(ROOT / page), "exec"), namespace)  # noqa: S102 - running the docs is the point
    return namespace


@pytest.fixture
def repo_like_cwd(tmp_path, monkeypatch):
    """A scratch folder standing in for the repository root: ``configs/`` linked, everything else fresh.

    A process group a failing snippet leaves behind is destroyed, so it cannot leak into later tests.
    """
    (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("page", PAGES)
def test_page_snippets_run_as_written(page: str, repo_like_cwd: Path) -> None:
    started = _cpu_seconds()
    run_page(page)
    used = _cpu_seconds() - started
    assert used < PAGE_CPU_SECONDS, (
        f"{page}: its snippets took {used:.1f} s of CPU; keep them tiny (< {PAGE_CPU_SECONDS:.0f} s)"
    )


def test_the_snippets_are_found() -> None:
    """The extraction sees the pages known to hold snippets, and no Python block holds a placeholder."""
    assert {"README.md", "docs/quickstart.rst", "docs/pipeline_engine.rst", "docs/pipeline_training.rst"} <= set(PAGES)
    placeholders = [
        f"{page}:{block.line}"
        for page in PAGES
        for block in page_blocks(page)
        if _has_ellipsis(block.code)
    ]
    assert not placeholders, f"'...' placeholders in the code of Python snippets: {placeholders}"


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (worker pools a snippet started)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _has_ellipsis(code: str) -> bool:
    """Whether ``...`` appears as code (not inside a comment or a string)."""
    tokens = tokenize.generate_tokens(io.StringIO(code).readline)
    return any(token.type == tokenize.OP and token.string == "..." for token in tokens)


def test_extraction_reads_nested_rst_blocks_with_options() -> None:
    text = textwrap.dedent(
        """\
        Title
        -----

        Term
           .. code-block:: python
              :linenos:

              x = 1

              y = x + 1

           after the block

        .. code-block:: bash

           echo not python
        """
    )
    (block,) = rst_blocks(text)
    assert block.code == "x = 1\n\ny = x + 1\n"
    assert block.line == 8
