"""Errors raised to users. Every message names the place (parameter, file:line) and the fix."""


class GeomCompileError(ValueError):
    """A user-facing error from geomcompile: bad policy, unsupported model, misuse of the API."""


class GeomCompileWarning(UserWarning):
    """A non-fatal problem that the plan also lists in ``plan.summary()``."""
