"""tensafe-bigram: an example third-party TenSafe ML backend (a byte-level bigram model).

Importing this package is cheap: the backend lives in :mod:`tensafe_bigram.backend`
and is imported only when the registered factory is called.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
