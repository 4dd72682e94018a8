"""Reading inputs and writing outputs so that every failure is one clear line.

* Inputs: a path that is a FIFO, a device or a folder where a file is expected (or the other way
  round) is named for what it is, before anything opens it (opening a FIFO would block); text
  that is not UTF-8 names the file and the byte.
* Outputs appear atomically (a temporary name in the same folder, fsync, rename), and a failed
  write removes its temporary, so a destination holds either nothing or a complete file.
No torch import here.
"""

import contextlib
import hashlib
import os
import stat
import tempfile
from typing import Iterator, List

from .errors import OutputError, UsageError, describe_os_error, is_os_failure


def describe_path(path: str) -> str:
    """What is at `path`, in words: 'a file', 'a folder', 'a FIFO (named pipe)', ..."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.islink(path) else "missing"
    except PermissionError:
        return "not accessible (permission denied on a folder above it)"
    except OSError as e:
        return f"not accessible ({e.strerror})"
    for test, name in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file or folder"


def require_file(path: str, what: str) -> None:
    """`path` must be a regular file (or a link to one)."""
    kind = describe_path(path)
    if kind == "missing":
        raise UsageError(f"{what} {path} does not exist; check the path")
    if kind != "a file":
        raise UsageError(f"{what} {path} is {kind}, not a file; give a regular file")


def require_folder(path: str, what: str) -> None:
    kind = describe_path(path)
    if kind == "missing":
        raise UsageError(f"{what} {path} does not exist; check the path")
    if kind != "a folder":
        raise UsageError(f"{what} {path} is {kind}, not a folder; give a folder")


@contextlib.contextmanager
def reading(path: str, what: str) -> Iterator[None]:
    """Turn an OS refusal to read `path` into one line naming it."""
    try:
        yield
    except (UsageError, OutputError):
        raise
    except Exception as e:
        if not is_os_failure(e):
            raise
        raise UsageError(f"{what} {describe_os_error(e, path, 'read it')}") from None


def read_bytes(path: str, what: str) -> bytes:
    require_file(path, what)
    with reading(path, what):
        with open(path, "rb") as f:
            return f.read()


def read_text(path: str, what: str) -> str:
    """A UTF-8 text file (a leading BOM is dropped)."""
    data = read_bytes(path, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None


def list_folder(path: str, what: str) -> List[str]:
    require_folder(path, what)
    with reading(path, what):
        return sorted(os.listdir(path))


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Turn an OS refusal to write `path` (permissions, read-only, no space, file too large; also
    when a library such as safetensors reports it as '(os error N)') into an OutputError."""
    try:
        yield
    except (UsageError, OutputError):
        raise
    except Exception as e:
        if not is_os_failure(e):
            raise
        raise OutputError(describe_os_error(e, path, "write it")) from None


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_folder(folder: str) -> None:
    """Make renames inside `folder` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """`path` gets `data` whole or is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _default_file_mode())  # mkstemp makes 0600; give what open() would
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    fsync_folder(folder)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_writable_folder(path: str, what: str) -> None:
    """`path` is (or can become) a folder this process can write to. Probes with a temporary file
    that is removed at once (permission bits alone say nothing for root or read-only mounts);
    creates nothing that stays."""
    probe_in = path
    while not os.path.lexists(probe_in):
        parent = os.path.dirname(os.path.abspath(probe_in))
        if parent == os.path.abspath(probe_in):
            break
        probe_in = parent
    kind = describe_path(probe_in)
    if kind != "a folder":
        if probe_in == path:
            raise UsageError(f"{what} {path} exists and is {kind}, not a folder; give a folder")
        raise UsageError(f"{what} {path} cannot be created: {probe_in} is {kind}, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tlora-write-test.", dir=probe_in)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        target = path if probe_in == path else f"{path} (in {probe_in})"
        raise UsageError(f"{what} {describe_os_error(e, target, 'write there')}") from None


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
