"""TenSafe: private LoRA fine-tuning with exact privacy accounting, signed and
encrypted adapter packages, and homomorphically encrypted adapter inference.

This package is the core: the plugin contracts (:mod:`tensafe.hookspecs`,
:mod:`tensafe.interfaces`), configuration, the orchestrator and the CLI.
Importing it is cheap and never imports torch.
"""

from __future__ import annotations

from tensafe.errors import TensafeError
from tensafe.hookspecs import hookimpl

__version__ = "0.2.0"

__all__ = ["InferenceSession", "TenSafeClient", "TensafeError", "TrainingSession", "__version__", "hookimpl"]
_SDK = frozenset({"TenSafeClient", "TrainingSession", "InferenceSession"})


def __getattr__(name: str) -> object:
    # The SDK loads on first use, so `import tensafe` stays cheap.
    if name in _SDK:
        from tensafe import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'tensafe' has no attribute {name!r}")
