"""What every page's callbacks share: the results store the app serves."""
from __future__ import annotations

import os
import threading

from ..store import Store

_local = threading.local()


def configure(store_path: str | os.PathLike | None) -> None:
    """Point the app at a store. Kept in the environment so that background-callback worker
    processes (which Dash starts) open the same file."""
    if store_path is not None:
        os.environ["WORKBENCH_STORE"] = str(store_path)


def store() -> Store:
    """This thread's connection to the app's store (`$WORKBENCH_STORE` or the default)."""
    path = os.environ.get("WORKBENCH_STORE", "")
    cached = getattr(_local, "store", None)
    if cached is None or getattr(_local, "path", None) != path:
        _local.store, _local.path = Store(path or None), path
    return _local.store
