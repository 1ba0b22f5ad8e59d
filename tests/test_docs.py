"""Every public name of the library appears in the API reference."""

from __future__ import annotations

from pathlib import Path

import instcontrast

API = (Path(__file__).resolve().parents[1] / "docs" / "api.rst").read_text()


def test_every_public_name_is_in_the_api_reference() -> None:
    missing = [name for name in instcontrast.__all__ if name != "__version__" and name not in API]
    assert not missing, f"add to docs/api.rst: {missing}"


def test_every_public_callable_has_a_docstring() -> None:
    undocumented = [
        name
        for name in instcontrast.__all__
        if callable(getattr(instcontrast, name)) and not (getattr(instcontrast, name).__doc__ or "").strip()
    ]
    assert not undocumented
