"""Expected errors and the boundary every command line puts around its work.

An *expected* error is a problem the user can fix (a bad config value, a missing or damaged file, an
unusable checkpoint, a full disk): it is raised as a `UserError` whose message names the problem and
the fix, and the entry point prints it as one line and exits with status 2. Anything else is a bug and
keeps its traceback. `--debug` on any command line (or PARCAE_DEBUG=1) shows the traceback of an
expected error too.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Sequence

EXIT_USER_ERROR = 2
DEBUG_FLAG = "--debug"
DEBUG_ENV = "PARCAE_DEBUG"

# OS errors that are about the user's disk or paths, not about our code.
_DISK_ERRNOS = {
    errno.ENOSPC: "the disk is full; free space or choose another location",
    errno.EDQUOT: "the disk quota is exhausted; free space or choose another location",
    errno.EACCES: "permission denied; choose a location you can write to (or fix its permissions)",
    errno.EPERM: "operation not permitted; choose a location you can write to (or fix its permissions)",
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another location",
    errno.EFBIG: "the file is larger than this system allows; free space or raise the limit",
}


class UserError(Exception):
    """A problem the user can fix; the message says what is wrong (with the values) and what to do."""


class ConfigError(UserError, ValueError):
    """A config value cannot be used; the message names the field, its value and the fix."""


class NotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or is not what the command needs)."""


class ExistsError(UserError, FileExistsError):
    """The destination exists and the command would not replace it without being told to."""


def disk_error_message(err: OSError) -> str | None:
    """One line for an OS error about the user's disk or paths (full, read-only, no permission), else
    None."""
    hint = _DISK_ERRNOS.get(err.errno)
    if hint is None:
        return None
    where = err.filename or "a file"
    return f"{where}: {err.strerror or os.strerror(err.errno)} ({hint})"


def one_line(err: BaseException) -> str | None:
    """The one-line report of an expected error, or None for anything that is a bug."""
    if isinstance(err, UserError):
        return " ".join(str(err).strip("'\"").split("\n"))
    if isinstance(err, OSError):
        return disk_error_message(err)
    return None


def debug_requested(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)` (argv without the program name, `--debug` taken out) inside the error
    boundary; returns the exit status. Use as `sys.exit(errors.run(main))`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return int(main(argv) or 0)
    except Exception as err:
        message = one_line(err)
        if message is None or debug:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
