"""The API boundary: whatever goes wrong underneath leaves a public function as a TGSPError.

The code raises specific :class:`~tensafe_tgsp.errors.TGSPError` subclasses
wherever it anticipates a failure. This decorator is the backstop at each
public entry point, so that no library error (``OSError``, ``ValueError``,
``struct.error``, ``InvalidTag``, ...) can escape with its own type; the
original stays attached as ``__cause__`` for debugging.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from cryptography.exceptions import InvalidKey, InvalidSignature, InvalidTag, UnsupportedAlgorithm

from tensafe_tgsp.errors import TGSPError

P = ParamSpec("P")
R = TypeVar("R")

_CONVERTED = (
    ValueError,  # includes UnicodeError and json.JSONDecodeError
    TypeError,
    LookupError,
    ArithmeticError,
    struct.error,
    RecursionError,
    InvalidTag,
    InvalidSignature,
    InvalidKey,
    UnsupportedAlgorithm,
)


def boundary(error: type[TGSPError], io_error: type[TGSPError]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Turn ``OSError`` into ``io_error`` and other library errors into ``error``."""

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return func(*args, **kwargs)
            except TGSPError:
                raise
            except OSError as exc:
                raise io_error(f"{func.__name__}: {exc.strerror or exc}") from exc
            except _CONVERTED as exc:
                raise error(f"{func.__name__}: {type(exc).__name__}: {exc}") from exc

        return wrapper

    return decorate
