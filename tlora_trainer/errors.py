"""What can go wrong in a run, and the one line (plus exit code) the command prints for it.

Every error the trainer raises on purpose is a `TrainerError` whose message already names the
file or option, the problem and the fix. Errors of the operating system (permissions, a full
disk, a file-size limit, a read-only file system) are turned into such a line by
`describe_os_error`, wherever they come from. No torch import here.
"""

import errno
import os
import re
from typing import Optional

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # bad arguments, files, resume state, or an output that cannot be written
EXIT_NOT_FINITE = 3  # the loss, the gradients or the weights became NaN/inf
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


class TrainerError(Exception):
    """A problem the user can fix; str(error) is the whole one-line message."""

    exit_code = EXIT_BAD_INPUT


class UsageError(TrainerError):
    """Bad arguments or input, found before any model is loaded."""


class ModelLoadError(TrainerError):
    """The base model could not be read (the message says why and what to do)."""


class StateError(TrainerError):
    """A resume state folder that is missing, corrupt, incomplete, of an old format, or of another run."""


class OutputError(TrainerError):
    """An output could not be written (permissions, read-only, no space, file too large)."""


class NonFiniteLoss(TrainerError):
    """The training loss, the gradients or the updated weights became NaN or infinite."""

    exit_code = EXIT_NOT_FINITE


# What to do about an OS error, by errno; the message names the path and the problem.
_FIXES = {
    errno.EACCES: "permission denied: fix the permissions (chmod/chown) or run as a user who may {verb} it",
    errno.EPERM: "operation not permitted: fix the permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose another --output_dir",
    errno.ENOSPC: "no space left on the device: free some space or choose another --output_dir",
    errno.EDQUOT: "the disk quota is exceeded: free some space or choose another --output_dir",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f): raise the limit or choose smaller outputs",
    errno.ENOENT: "it does not exist: check the path",
    errno.ENOTDIR: "a part of the path is not a folder: check the path",
    errno.EISDIR: "it is a folder, not a file: give a file",
    errno.ELOOP: "too many symbolic links (a loop?): check the links",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
    errno.EIO: "an input/output error of the device: check the disk",
}

# how Rust libraries (safetensors) print an OS error: "(os error 28)" or "Os { code: 28, ... }"
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)|Os \{ code: (\d+)")


def os_errno(error: BaseException) -> Optional[int]:
    """The errno of an OSError, or of an error of a library that wraps one in its message."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno
    match = _OS_ERROR_IN_TEXT.search(str(error))
    return int(match.group(1) or match.group(2)) if match else None


def describe_os_error(error: BaseException, path: Optional[str] = None, action: str = "access") -> str:
    """One line: '<path>: cannot <action>: <problem and fix>'."""
    number = os_errno(error)
    path = path or getattr(error, "filename", None) or "a file"
    verb = "write" if action.startswith("write") else "read" if action.startswith("read") else "use"
    if number in _FIXES:
        problem = _FIXES[number].format(verb=verb)
    else:
        reason = getattr(error, "strerror", None) or (os.strerror(number) if number else str(error))
        problem = f"{reason}; check the path and the device"
    return f"{path}: cannot {action}: {problem}"


def is_os_failure(error: BaseException) -> bool:
    """True for errors that are really the operating system refusing a read or a write."""
    return isinstance(error, OSError) or os_errno(error) is not None
