"""Files that appear whole or not at all: written under a temporary name, flushed to disk, renamed.

Shared by everything the package writes for later use: adapter files (``save_adapter``),
training checkpoint directories and exported PEFT folders.
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
import sys


def make_sibling_dir(parent: str, prefix: str) -> str:
    # not tempfile.mkdtemp: its mode 0700 would stay on the directory once renamed into place
    while True:
        d = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(d)
            return d
        except FileExistsError:
            continue


def write_durably(path: str, data) -> None:
    """Write bytes (or call ``data(file)``), then fsync, so a rename after it never exposes a hole."""
    with open(path, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc before 2.28, or another libc
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False  # kernel or file system without it (EPERM: seccomp filters that refuse it)
    raise OSError(code, os.strerror(code), b)


def install(tmp: str, path: str) -> None:
    """Put the complete directory ``tmp`` at ``path``; an existing checkpoint there is replaced whole."""
    parent, name = os.path.split(path)
    parent = parent or "."
    if not os.path.lexists(path):
        os.rename(tmp, path)
        fsync_dir(parent)
    elif _exchange(tmp, path):  # path is the old or the new checkpoint at every instant
        fsync_dir(parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now the old one; a leftover would only cost disk space
    else:
        # Two renames: a crash between them leaves the old checkpoint complete at the aside
        # name, which resume's error message points to.
        aside = os.path.join(parent, f".{name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(path, aside)
        try:
            os.rename(tmp, path)
        except OSError:
            os.rename(aside, path)
            raise
        fsync_dir(parent)
        shutil.rmtree(aside, ignore_errors=True)
