"""The demo content a new user's store starts with: a shipped study and measured CPU runs.

`workbench/data/demo-store.db` is built by `python -m workbench.app.demo build` (it runs
`studies/llama3-strong-scaling.toml` and `studies/cpu-validation.toml`: the CPU runs are real
measurements of this project's reference host, stored beside their predictions). `workbench
app` copies it into an empty store, so the pages show real content at once.
"""
from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

DEMO_DB = Path(__file__).resolve().parents[1] / "data" / "demo-store.db"
"""The packaged demo store."""
DEMO_STUDIES = ("llama3-strong-scaling.toml", "cpu-validation.toml")
"""The studies the demo store holds (from `studies/`)."""


def seed_if_empty(store, demo: Path = DEMO_DB) -> bool:
    """Copy the demo store into `store` when it holds no study and no result; True if it did.

    A store with anything in it is never touched. ValueError if the demo file is missing.
    """
    if store.studies() or store.results(limit=1, with_payload=False):
        return False
    if not Path(demo).is_file():
        raise ValueError(f"demo store {demo} is missing; build it with "
                         "`python -m workbench.app.demo build` or run with --no-demo")
    src = sqlite3.connect(f"file:{demo}?mode=ro", uri=True)
    try:
        with store._lock:  # one consistent copy, page by page, into the empty store
            src.backup(store._conn)
    finally:
        src.close()
    return True


def build(out: Path = DEMO_DB, studies_dir: Path | None = None, match: str | None = None) -> None:
    """Run the demo studies into a fresh store at `out` (replacing it)."""
    from ..store import Store
    from ..study import load
    from ..study_run import run_study

    studies_dir = studies_dir or Path(__file__).resolve().parents[2] / "studies"
    tmp = Path(str(out) + ".tmp")
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    store = Store(tmp)
    for name in DEMO_STUDIES:
        study = load(studies_dir / name)
        print(f"demo: {study.name} ({len(study.points)} points)", file=sys.stderr)
        run_study(study, store, match=match if "run" in study.stages else None)
    store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store._conn.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
    store._conn.execute("VACUUM")
    store.close()
    tmp.replace(out)
    print(f"demo store written: {out} ({out.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)


def main(argv=None) -> int:
    """`python -m workbench.app.demo build [--out PATH] [--match TEXT]`."""
    p = argparse.ArgumentParser(prog="python -m workbench.app.demo")
    p.add_argument("command", choices=("build",))
    p.add_argument("--out", type=Path, default=DEMO_DB)
    p.add_argument("--match", help="only the CPU points whose key contains this text")
    args = p.parse_args(argv)
    build(args.out, match=args.match)
    return 0


if __name__ == "__main__":
    sys.exit(main())
