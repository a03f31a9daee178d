"""The TenSafe HTTP server (``tensafe serve``): sessions over the orchestrator, for many tenants.

Needs the server extra: ``python -m pip install './tensafe-core[server]'``. State lives in a
relational database through SQLAlchemy (SQLite in the data directory by default,
PostgreSQL by URL); artifacts live on disk, encrypted with per-tenant keys that
a master key wraps. Importing this package imports none of its dependencies.
"""

from __future__ import annotations

from tensafe.errors import MissingDependencyError

SERVER_EXTRA = "python -m pip install './tensafe-core[server]'"


def require(module: str) -> None:
    """Fail with an actionable message when a server dependency is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"the TenSafe server needs {module!r}; install it with: {SERVER_EXTRA}")
