"""tensafe-he-seal: the ``seal-ckks`` HE backend (Microsoft SEAL's CKKS through Pyfhel).

Importing this package imports neither Pyfhel nor numpy; the backend module does.
"""

from __future__ import annotations

__version__ = "0.2.0"
