"""Opening an input file (a package, a key file, a JSON input, a file to pack) without blocking on it.

Opening a FIFO for reading blocks until some process opens it for writing, and
opening a device may block or act on the device. Checking the type with
``stat`` before opening would race with a swap of the file. So inputs are opened
with ``O_NONBLOCK``, which returns at once whatever the file is, checked with
``fstat`` on the open descriptor, and refused unless they are regular files;
only then is the descriptor made blocking again and read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from tensafe_tgsp.errors import TGSPError

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words (``a FIFO (named pipe)``, ``a directory``...)."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "a special file"


def open_regular_file(
    path: str | os.PathLike[str], *, what: str, error: type[TGSPError], follow_symlinks: bool = True
) -> tuple[int, os.stat_result]:
    """A read-only, blocking descriptor of ``path`` and its ``fstat``, if ``path`` is a regular file.

    Anything else (FIFO, device, directory, socket) raises ``error``, naming
    the file as ``what`` (``"package"``, ``"key file"``...), at once, without
    waiting on it. ``OSError`` from opening propagates, for the caller
    to word. With ``follow_symlinks=False`` a symbolic link fails to open
    (``ELOOP``). The caller owns (and closes) the descriptor.
    """
    flags = os.O_RDONLY | _NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = file_kind(info.st_mode)
            raise error(f"{what} {os.fspath(path)} is {kind}, not a regular file; refusing to read it")
        if _NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, info
