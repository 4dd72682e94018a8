"""Helpers of the bad-input and fault tests: snapshots of input folders, dropped privileges (root
ignores permission bits) and small tmpfs disks (full, read-only). No tests in here."""

import contextlib
import hashlib
import os
import pwd
import shutil
import stat
import subprocess

import pytest


def snapshot(root: str) -> dict:
    """Every entry under root: kind, mode, size, link target and content hash (files only; a FIFO
    is never opened)."""
    result = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            entry = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode))
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    entry += (st.st_size, hashlib.sha256(f.read()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(path),)
            result[os.path.relpath(path, root)] = entry
    return result


def nobody_ids():
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


@contextlib.contextmanager
def privileges_of_nobody():
    """Effective uid/gid of nobody for the block (root would ignore permission bits)."""
    if os.geteuid() != 0:
        yield
        return
    ids = nobody_ids()
    if ids is None:
        pytest.skip("no user 'nobody' to drop privileges to")
    uid, gid = ids
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@contextlib.contextmanager
def mounted_tmpfs(path: str, options: str):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8); this machine has neither")
    os.makedirs(path, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the disk-full and read-only cases need one")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)
