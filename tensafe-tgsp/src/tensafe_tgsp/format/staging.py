"""Staging directories: where unpack writes before its final rename, and how a killed unpack's are removed.

:func:`~tensafe_tgsp.format.unpack` decrypts into a fresh directory
``.tgsp-unpack-XXXXXXXX`` (mode 0700) next to the destination, holds an
exclusive ``flock`` on it while it works, and renames it into place only once
every check has passed. A process killed before that rename (SIGKILL, a crash,
power loss) leaves the directory behind, with decrypted files in it.

The next unpack into the same parent directory removes such leftovers. A
directory is removed only when all of these hold:

* its name is exactly a staging name (``.tgsp-unpack-`` and the 8 characters
  ``tempfile.mkdtemp`` adds), and it is a directory, not a symbolic link;
* it belongs to the user running the unpack;
* no process holds its lock: the kernel releases a lock when its holder dies,
  so a live unpack, however long it runs, keeps its directory;
* it was last modified at least :data:`STALE_AFTER_SECONDS` ago. This covers
  the instant between creating a directory and locking it; for an unpack that
  does not lock (an older TenSafe version) it is the only protection, and it
  lasts that long after the unpack last created a top-level entry.

Where locks cannot be taken (no ``flock``, or a file system that refuses it)
nothing is ever judged stale, so nothing is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tensafe_tgsp.errors import PackageIOError

if sys.platform != "win32":
    import fcntl

STAGING_PREFIX = ".tgsp-unpack-"
#: ``tempfile.mkdtemp(prefix=STAGING_PREFIX)`` names: the prefix and 8 characters of ``[a-z0-9_]``.
STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r"[a-z0-9_]{8}")
#: A staging directory that no process has locked and nothing modified for this long is a dead unpack's.
STALE_AFTER_SECONDS = 10 * 60

_logger = logging.getLogger(__name__)


def _lock(fd: int, *, wait: bool) -> bool:
    """Take the exclusive lock on an open staging directory; False if it is held or locks are unavailable."""
    if sys.platform == "win32":
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


def _open_directory(path: Path) -> int:
    """A descriptor of the directory ``path`` itself; ``OSError`` if it is a link or not a directory."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags)


def _is_stale(fd: int, path: Path) -> bool:
    """Whether the open staging directory ``fd`` (at ``path``) is a dead unpack's; leaves it locked if so."""
    if not _lock(fd, wait=False):
        return False
    info = os.fstat(fd)
    return (
        info.st_uid == os.geteuid()
        and time.time() - info.st_mtime >= STALE_AFTER_SECONDS
        and os.path.samestat(info, os.lstat(path))
    )


def _remove_if_stale(path: Path) -> bool:
    try:
        fd = _open_directory(path)
    except OSError:
        return False  # gone meanwhile, a link, not a directory, or not ours to read
    try:
        if not _is_stale(fd, path):
            return False
        shutil.rmtree(path)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove the staging directories that killed unpacks left in ``parent``; returns those removed.

    Best effort: a directory that cannot be judged or removed is left alone,
    and nothing here raises.
    """
    if sys.platform == "win32":
        return []
    try:
        with os.scandir(parent) as entries:
            candidates = [parent / entry.name for entry in entries if STAGING_NAME.fullmatch(entry.name)]
    except OSError:
        return []
    removed = [path for path in candidates if _remove_if_stale(path)]
    for path in removed:
        _logger.warning("removed %s: an interrupted unpack left it behind, with decrypted files in it", path)
    return removed


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and missing ancestors; returns those created, deepest first."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            pass
        except OSError as exc:
            _remove_dirs(missing)
            raise PackageIOError(f"cannot create {path}: {exc.strerror or exc}") from None
    return missing


def _remove_dirs(paths: Iterable[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.rmdir()


def _hold(directory: Path) -> int | None:
    """A descriptor holding the lock on a new staging directory, or None where locks are unavailable."""
    try:
        fd = _open_directory(directory)
    except OSError:
        return None
    if _lock(fd, wait=True):
        return fd
    os.close(fd)
    return None


@contextlib.contextmanager
def staging_directory(target: Path) -> Iterator[Path]:
    """A fresh, locked staging directory next to ``target``, for the caller to fill and rename to ``target``.

    On any error in the ``with`` block the directory is removed, and so are the
    parent directories made for it; an ``OSError`` becomes a
    :class:`PackageIOError`.
    """
    created = _make_parents(target.parent)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target.parent))
    except OSError as exc:
        _remove_dirs(created)
        raise PackageIOError(f"cannot create a directory in {target.parent}: {exc.strerror or exc}") from None
    lock = _hold(scratch)
    try:
        yield scratch
    except BaseException as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        _remove_dirs(created)
        if isinstance(exc, OSError):
            raise PackageIOError(f"cannot write {target}: {exc.strerror or exc}") from None
        raise
    finally:
        if lock is not None:
            os.close(lock)
