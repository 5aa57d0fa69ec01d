"""The one family of input errors. Every check of what a user gave (flags, files, configs, models or data that
cannot be reached, optional packages that are missing, a run in use) raises a `UserError`; the command line turns
it into one `error:` line (sorsa/cli.py). Anything else is a bug and keeps its traceback.

UserError subclasses ValueError, so library callers that catch ValueError keep working; the subclasses below
also carry the built-in type a caller may expect (FileNotFoundError, FileExistsError, ImportError).
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input: reported as one line naming the problem and what to do, without a traceback."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named (or that a named run should hold) does not exist."""


class InTheWayError(UserError, FileExistsError):
    """A path the job would write holds something else (a folder this project did not make)."""


class MissingPackageError(UserError, ImportError):
    """An optional package that this job needs is not installed."""


class UnreachableError(UserError, RuntimeError):
    """A hub model or dataset could not be reached (offline, missing or gated)."""


def require_package(module: str, purpose: str, install: str | None = None):
    """Import and return `module`, or raise a MissingPackageError naming `purpose` and the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        command = install or f"pip install {module}"
        raise MissingPackageError(f"{purpose} needs the {module} package, which is not installed ({err}); "
                                  f"install it with: {command}") from None
