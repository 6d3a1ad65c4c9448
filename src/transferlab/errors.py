"""The one exception type for mistakes a user can fix."""

from __future__ import annotations

from hydra.errors import CompactHydraException


class UserError(CompactHydraException):
    """A problem with the user's input (config, data, paths), reported as one actionable line.

    Hydra prints exceptions of this family without a traceback and exits non-zero, and so
    does the ``transferlab`` CLI; anything else that escapes is a bug and keeps its traceback.
    """
