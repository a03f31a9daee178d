"""Futures for queued session operations: ``result(timeout)`` waits, then returns or raises."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as _FutureTimeout
from typing import Generic, TypeVar

T = TypeVar("T")


class APIFuture(Generic[T]):
    """The result of an operation queued on a session, in the order it was submitted.

    In-process it wraps the session worker's future; against a server it asks
    the server (which waits up to 30 s per request) until the operation finished.
    """

    def __init__(self, future_id: str, waiter: Callable[[float | None], T] | Future[T]) -> None:
        self.future_id = future_id
        self._waiter = waiter
        self._lock = threading.Lock()
        self._done = False
        self._value: T | None = None
        self._error: BaseException | None = None

    def result(self, timeout: float | None = None) -> T:
        """The operation's result; raises its typed error, or ``TimeoutError`` after ``timeout`` seconds."""
        with self._lock:
            if not self._done:
                try:
                    if isinstance(self._waiter, Future):
                        self._value = self._waiter.result(timeout)
                    else:
                        self._value = self._waiter(timeout)
                except (TimeoutError, _FutureTimeout):
                    raise TimeoutError(f"operation {self.future_id} did not finish within {timeout} s") from None
                except Exception as exc:
                    self._error = exc
                self._done = True
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def done(self) -> bool:
        return self._done or (isinstance(self._waiter, Future) and self._waiter.done())
