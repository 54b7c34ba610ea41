"""The `workbench calibrate` command: its options, the profile file it writes, and which of
the calibration's parts (`calibrate_collectives.calibrate`, `--merge`, `--fit-on`) it runs.

The measurements themselves are in `calibrate.py` (the chip) and the `calibrate_*.py`
modules beside it."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from .calibrate import Settings


def parse_worlds(text: str) -> tuple[int, ...]:
    """`"2,4"` -> (2, 4); ValueError naming `--world` for anything else."""
    try:
        worlds = tuple(int(w) for w in str(text).split(",") if w.strip())
    except ValueError:
        raise ValueError(f"--world must be comma-separated integers, got {text!r}") from None
    if not worlds or min(worlds) < 1:
        raise ValueError(f"--world must list world sizes >= 1, got {text!r}")
    return worlds


def write_profile(profile: dict, path: str | Path) -> None:
    """Write a profile (JSON), after checking that it loads as a cluster."""
    from . import hardware
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"--out {path}: the profile file name must end in .json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(profile, indent=2) + "\n")
    try:
        for ranks in [None] + [w["ranks"] for w in profile.get("worlds", [])]:
            hardware.load_cpu_cluster(ranks, path=tmp)
    except ValueError:
        tmp.unlink()
        raise
    os.replace(tmp, path)


def cmd_calibrate(args) -> int:
    """`workbench calibrate`: measure, write the profile, print where it went."""
    from .calibrate_collectives import calibrate
    if args.fit_repeat < 1 or (args.fit_repeat != 1 and not args.fit_on):
        rule = "must be >= 1" if args.fit_repeat < 1 else "goes with --fit-on STUDY"
        print(f"error: --fit-repeat {args.fit_repeat}: {rule}")  # before any measuring
        return 2
    fits = args.fit_on or getattr(args, "refit_kept", False)
    if getattr(args, "fit_compute_level", False) and not fits:
        print("error: --fit-compute-level goes with --fit-on STUDY or --refit-kept")
        return 2
    if args.merge or args.profile:  # refit measured figures, measure nothing new but --fit-on
        from .calibrate_fit import cmd_refit
        return cmd_refit(args)
    try:
        settings = Settings(device=args.device, worlds=parse_worlds(args.world),
                            quick=args.quick, repeats=3 if args.quick else 7,
                            min_sample_s=0.002 if args.quick else 0.02,
                            ops_for=tuple(args.ops_for or ()))
        if settings.ops_for:
            from .calibrate_ops import study_ops
            study_ops(settings.ops_for)  # a bad study file fails here, before measuring
        if args.fit_on:
            from .calibrate_fit import check_fit_study
            check_fit_study(args.fit_on)
    except (ValueError, OSError) as e:
        print(f"error: {e}")
        return 2
    if settings.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("error: --device cuda: no CUDA device is visible to torch")
            return 2
    start = time.perf_counter()
    profile = calibrate(settings)
    if args.fit_on:
        from .calibrate_fit import fit_for_args
        profile = fit_for_args(profile, args)
    write_profile(profile, args.out)
    chip = profile["chip"]
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s: fp32 peak "
          f"{chip['dense_flops_per_s']['fp32'] / 1e9:.1f} GFLOP/s, memory "
          f"{chip['memory_bandwidth_Bps'] / 1e9:.1f} GB/s, worlds "
          f"{', '.join(str(w['ranks']) for w in profile['worlds'])}")
    return 0


def add_command(subparsers) -> argparse.ArgumentParser:
    """Add `calibrate` to a `workbench` argparse subparsers object (func(args) -> exit code)."""
    p = subparsers.add_parser("calibrate", help="measure this device; write a chip and cluster "
                                                "profile the cost model loads like a preset")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    p.add_argument("--out", default="calibration.json", help="profile file to write (.json); "
                   "workbench/data/cpu.json is the default cpu profile")
    p.add_argument("--world", default="2,4", help="world sizes to calibrate, e.g. 2,4 (ranks "
                   "beyond the cores share them); the one-rank-per-core world is always added")
    p.add_argument("--quick", action="store_true", help="few sizes and repeats (tests)")
    p.add_argument("--ops-for", action="append", metavar="STUDY",
                   help="also time every GEMM-like op of this study's points at its exact "
                        "shape, and one microbatch of each of its models whole (repeatable; "
                        "studies/cpu-validation.toml for the CPU loop)")
    p.add_argument("--merge", nargs="+", metavar="PROFILE",
                   help="measure nothing: fit one profile from the median of these "
                        "calibrations' raw figures (same host, --world, --quick, --ops-for)")
    p.add_argument("--fit-on", metavar="STUDY", help="then train this study's points for real "
                   "and scale the framework figures to them (calibrate_fit.py; "
                   "studies/cpu-calibration.toml for the CPU loop)")
    p.add_argument("--fit-repeat", type=int, default=1, metavar="N",
                   help="with --fit-on: train each of the study's points N times, in rounds "
                        "over the study, and fit to each point's median (default 1)")
    p.add_argument("--fit-compute-level", action="store_true",
                   help="with --fit-on or --refit-kept: also fit one scale on every timed "
                        "microbatch (calibrate_fit.COMPUTE_LEVEL; off by default, see "
                        "DEFAULT_FIT_GROUPS)")
    p.add_argument("--profile", metavar="PROFILE", help="measure nothing but --fit-on: start "
                   "from this profile instead of a new calibration")
    p.add_argument("--refit-kept", action="store_true",
                   help="with --profile: fit again to the real runs its framework fit keeps "
                        "(none trained; after a change to the fit or the cost model)")
    p.set_defaults(func=cmd_calibrate)
    return p
