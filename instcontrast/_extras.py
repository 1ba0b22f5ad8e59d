"""Install hints for the optional extras, in one module that every other module may import.

Nothing here imports from the rest of the package, so :mod:`instcontrast._backend` and
:mod:`instcontrast.ops.triton` both take the hint from here without importing each other.
"""

from __future__ import annotations

__all__ = ["TRITON_INSTALL_HINT"]

TRITON_INSTALL_HINT = "pip install 'instcontrast[triton]'"
"""What to run when the optional Triton kernels are requested but ``triton`` is missing."""
