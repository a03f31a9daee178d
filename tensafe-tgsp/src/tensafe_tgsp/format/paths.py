"""Archive paths (SPEC.md, "Paths"): what a safe path is, and which paths collide."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from tensafe_tgsp.errors import UnsafePath
from tensafe_tgsp.format.spec import MAX_COMPONENT_BYTES, MAX_PATH_BYTES

_FORBIDDEN_PATH_CHARS = re.compile(r"[\x00-\x1f\x7f\\:]")


def check_path(path: Any) -> str:
    """Return ``path`` if it is a safe relative archive path, else raise :class:`UnsafePath`.

    Safe: a non-empty string of ``/``-separated components, at most 1024 UTF-8
    bytes (255 per component); no leading ``/``, no empty, ``.`` or ``..``
    component, no backslash, colon or control character.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePath(f"unsafe path {path!r}: paths are non-empty strings")
    try:
        encoded = path.encode("utf-8")
    except UnicodeError:
        raise UnsafePath(f"unsafe path {path!r}: not encodable as UTF-8") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise UnsafePath(f"unsafe path {path[:64]!r}...: longer than {MAX_PATH_BYTES} bytes")
    if path.startswith("/"):
        raise UnsafePath(f"unsafe path {path!r}: absolute paths are refused")
    if _FORBIDDEN_PATH_CHARS.search(path):
        raise UnsafePath(f"unsafe path {path!r}: backslashes, colons and control characters are refused")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePath(f"unsafe path {path!r}: empty, '.' and '..' components are refused")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise UnsafePath(f"unsafe path {path!r}: a component is longer than {MAX_COMPONENT_BYTES} bytes")
    return path


class PathSet:
    """Paths seen so far; refuses duplicates, and a path that is both a file and a directory.

    Paths are compared after NFC normalisation and case folding, so no two
    entries can land on the same file on a case-insensitive file system.
    """

    def __init__(self) -> None:
        self._files: set[str] = set()
        self._dirs: set[str] = set()

    def add(self, path: str) -> None:
        key = unicodedata.normalize("NFC", path).casefold()
        if key in self._files:
            raise UnsafePath(f"duplicate path {path!r}")
        if key in self._dirs:
            raise UnsafePath(f"path {path!r} is both a file and a directory")
        parts = key.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in self._files:
                raise UnsafePath(f"path {path!r} is inside {parent!r}, which is a file")
            self._dirs.add(parent)
        self._files.add(key)
