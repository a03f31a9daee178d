"""numpy, imported when HE-LoRA first needs it."""

from __future__ import annotations

from typing import Any

from tensafe.errors import MissingDependencyError


def numpy_module() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with every HE backend
        raise MissingDependencyError("HE-LoRA needs numpy: pip install numpy") from None
    return numpy
