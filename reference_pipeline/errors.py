"""The error a user can fix: printed by the command line as one line, without a traceback.

A :class:`UserError` says what is wrong with the *input* — a config value, a path, a dataset, a run
directory that holds another run — and what to do about it. Anything else (a bug in the pipeline or
in a user's model) keeps its traceback. It subclasses :class:`ValueError`, so code that caught the
``ValueError`` these checks raised before keeps working.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input a user can fix; the message names the value or path and what is expected."""
