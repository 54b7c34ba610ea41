"""Build and serve the Dash app on 127.0.0.1."""
from __future__ import annotations

import tempfile
from pathlib import Path

PAGES_DIR = Path(__file__).parent / "pages"


def create_app(store_path=None, cache_dir: str | None = None):
    """The multi-page Dash app over the store at `store_path` (default: the default store).

    Long work (studies, searches) runs as Dash background callbacks in worker processes
    managed through a diskcache directory (`cache_dir`, default a temporary one).
    """
    import dash
    import diskcache
    from dash import DiskcacheManager, dcc, html

    from .context import configure

    configure(store_path)
    cache = diskcache.Cache(cache_dir or tempfile.mkdtemp(prefix="workbench-app-"))
    app = dash.Dash(__name__, use_pages=True, pages_folder=str(PAGES_DIR),
                    background_callback_manager=DiskcacheManager(cache),
                    suppress_callback_exceptions=True, title="workbench")
    links = [dcc.Link(page["name"], href=page["relative_path"], className="nav-link",
                      id=f"nav-{page['module'].rsplit('.', 1)[-1]}")
             for page in sorted(dash.page_registry.values(), key=lambda p: p.get("order", 99))]
    app.layout = html.Div([
        html.Header([html.Strong("workbench", className="brand"), html.Nav(links)],
                    className="topbar"),
        html.Main(dash.page_container, className="content"),
    ])
    return app


def serve(host: str = "127.0.0.1", port: int = 8050, store_path=None, debug: bool = False):
    """Serve the app until interrupted (loopback only by default)."""
    app = create_app(store_path)
    print(f"workbench app on http://{host}:{port}/  (store: {_store_path()})", flush=True)
    app.run(host=host, port=port, debug=debug)


def _store_path() -> str:
    from .context import store
    return str(store().path)


def add_command(sub) -> None:
    """Add `workbench app` to the CLI's subparsers."""
    a = sub.add_parser("app", help="serve the web app on 127.0.0.1 (default store, demo included)")
    a.add_argument("--store", help="SQLite store (default $WORKBENCH_STORE or ~/.local/share)")
    a.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    a.add_argument("--port", type=int, default=8050)
    a.add_argument("--no-demo", action="store_true",
                   help="do not seed an empty store with the demo study and CPU runs")
    a.add_argument("--debug", action="store_true", help="Dash debug mode (reloads, tracebacks)")
    a.set_defaults(func=_cmd_app)


def _cmd_app(args) -> int:
    from ..store import Store
    from .demo import seed_if_empty

    store = Store(args.store)
    if not args.no_demo and seed_if_empty(store):
        print(f"seeded {store.path} with the demo study and measured CPU runs", flush=True)
    path = store.path
    store.close()
    serve(args.host, args.port, path, debug=args.debug)
    return 0
