"""`workbench study run|list|show`: the study commands (wired into `workbench.cli`)."""
from __future__ import annotations

import sys


def add_command(sub) -> None:
    """Add `study` with its `run`, `list` and `show` subcommands to the CLI's subparsers."""
    s = sub.add_parser("study", help="run a scaling study (TOML) and list stored studies")
    ssub = s.add_subparsers(dest="study_command", required=True)
    r = ssub.add_parser("run", help="expand a study's grid and evaluate every pending point")
    r.add_argument("file", help="study TOML (see studies/)")
    r.add_argument("--store", help="SQLite store (default $WORKBENCH_STORE or ~/.local/share)")
    r.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local processes (default) or a Ray cluster")
    r.add_argument("--jobs", type=int, help="local worker processes (default: the cores)")
    r.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    r.add_argument("--match", help="only points whose key contains this text")
    r.add_argument("--dry-run", action="store_true",
                   help="check the study and list its points; run nothing")
    r.set_defaults(func=cmd_study_run)
    ls = ssub.add_parser("list", help="studies in the store")
    ls.add_argument("--store")
    ls.set_defaults(func=cmd_study_list)
    sh = ssub.add_parser("show", help="a stored study's points: predicted, simulated, measured")
    sh.add_argument("file", help="study TOML")
    sh.add_argument("--store")
    sh.set_defaults(func=cmd_study_show)


def cmd_study_run(args) -> int:
    """Run (or resume) a study and print its table."""
    from .store import Store
    from .study import load
    from .study_run import format_seconds, pending_points, run_study

    study = load(args.file)
    if args.dry_run:
        for p in study.points:
            print(p.key)
        print(f"{len(study.points)} points; stages: {', '.join(study.stages)}")
        return 0
    store = Store(args.store)
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    print(f"study {study.name}: {study.question}", file=sys.stderr)
    print(f"{len(study.points)} points ({len(pending_points(study, store))} to do), "
          f"stages: {', '.join(study.stages)}; store {store.path}", file=sys.stderr)
    try:
        summary = run_study(study, store, executor=args.executor, jobs=args.jobs,
                            ray_address=args.ray_address, match=args.match)
    except KeyboardInterrupt:
        print("\ninterrupted: every finished point is stored; run the same command again "
              "to resume", file=sys.stderr)
        return 130
    _print_table(study, store)
    print(f"\n{summary.stored} points stored ({summary.failed} failed), {summary.skipped} "
          f"already stored, in {format_seconds(summary.seconds)}")
    return 0


def cmd_study_list(args) -> int:
    """Print the stored studies."""
    from .cli import table
    from .store import Store

    rows = Store(args.store).studies()
    print(table(rows, ["name", "n_results", "created_at"]) if rows else "no studies stored")
    return 0


def cmd_study_show(args) -> int:
    """Print a study's stored points."""
    from .store import Store
    from .study import load

    _print_table(load(args.file), Store(args.store))
    return 0


def _print_table(study, store) -> None:
    from .cli import table
    from .study_run import summary_rows

    rows = summary_rows(study, store)
    for r in rows:
        for k, v in list(r.items()):
            if isinstance(v, float):
                r[k] = f"{v * 100:.1f}%" if k.endswith("_mfu") else f"{v:.4g}"
            elif v is None:
                r[k] = "-"
    print(table(rows, list(rows[0])) if rows else "no points")
