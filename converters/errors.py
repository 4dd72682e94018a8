"""One line for every failure a command-line user can meet: our own errors as they are, and the
operating system's (permissions, read-only or full disks, size limits, missing paths) with the
file, the problem and what to do."""

import errno
import os
from typing import Optional

_OS_ERRORS = {
    errno.EACCES: ("permission denied", "check the file's and folder's permissions, or choose another location"),
    errno.EPERM: ("operation not permitted", "check the file's and folder's permissions, or choose another location"),
    errno.EROFS: ("the file system is read-only", "write to another folder"),
    errno.ENOSPC: ("no space left on the device", "free some space or write to another disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or write to another disk"),
    errno.EFBIG: ("the file is larger than this process may write (file-size limit)", "raise the limit (ulimit -f) or write less"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.ENOTDIR: ("a part of the path is not a folder", "check the path"),
    errno.EEXIST: ("a part of the path exists and is not a folder", "check the path"),
    errno.EISDIR: ("it is a folder, not a file", "give a file name"),
    errno.ENAMETOOLONG: ("the file name is too long", "choose a shorter name"),
    errno.EMFILE: ("too many open files", "close other programs or raise the limit (ulimit -n)"),
    errno.EIO: ("an input/output error of the device", "check the disk"),
}


def os_error_message(error: OSError, default_path: Optional[str] = None) -> str:
    """'<path>: <problem>; <fix>' for an OSError (safetensors' own write errors included)."""
    path = getattr(error, "filename", None) or default_path or "file"
    code = getattr(error, "errno", None)
    if code in _OS_ERRORS:
        problem, fix = _OS_ERRORS[code]
        return f"{path}: {problem}; {fix}"
    detail = error.strerror or str(error) or type(error).__name__
    return f"{path}: {detail}"


def describe_failure(error: BaseException, default_path: Optional[str] = None) -> Optional[str]:
    """The one-line message for an error the commands report (None: not one of ours, re-raise).

    safetensors' Rust writer reports OS failures as its own error type with the OS message in
    the text; they are mapped here by that text."""
    if isinstance(error, OSError):
        return os_error_message(error, default_path)
    text = str(error)
    if type(error).__name__ == "SafetensorError":
        for code, (problem, fix) in _OS_ERRORS.items():
            if os.strerror(code) in text:
                return f"{default_path or 'file'}: {problem}; {fix}"
        return f"{default_path or 'file'}: {text}"
    return None
