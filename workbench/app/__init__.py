"""The Dash web app (`workbench app`): plan explorer, scaling studies, validation, reports.

Pages (`pages/`) are thin adapters: their callbacks only call the tested pure functions of
the `*_view.py` modules here. `server.py` builds the app; `context.py` gives callbacks the
results store.
"""
from .server import create_app, serve

__all__ = ["create_app", "serve"]
