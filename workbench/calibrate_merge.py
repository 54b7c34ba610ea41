"""`workbench calibrate --merge`: one profile from several calibrations of the same host.

A calibration's framework figures are fits of small differences measured on a shared host,
and they move between calibrations more than the host does: on the 2-core CPU host, two
calibrations half an hour apart fitted world 4's bandwidth at 1.85 and 0.92 GB/s, FSDP's
cost per microbatch at 1.9 and 0 ms, the overlap of communication and compute at 0 and 0.09
(`benchmarks/results-cpu-validation-2026-12-05e.txt`). Every calibration keeps its raw
figures (`measurement.raw`: the median over ranks of every timing, before any fit), so
several can be pooled before fitting: `merge_profiles` takes the median of every raw figure
over the calibrations and fits the profile from those medians with the calibration's own
code (`calibrate_collectives.profile_from_raw`). The 222 runs of that validation, each
against one prediction: median error 7.0% and 178 within 15% with the median of three
calibrations, 7.5-7.8% and 167-176 with each of them alone.
"""
from __future__ import annotations

import json
from pathlib import Path

from .calibrate import Settings
from .calibrate_collectives import merge_ranks, profile_from_raw, utc_stamp


def _same_shape(a, b, where: str) -> None:
    """ValueError naming the first place (`where`, a key path) where `b`'s structure (keys,
    list lengths, number or text) differs from `a`'s."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            extra = sorted(set(b) - set(a)) if isinstance(b, dict) else []
            missing = sorted(set(a) - set(b)) if isinstance(b, dict) else []
            raise ValueError(f"{where}: the calibrations measured different things "
                             f"(missing {missing[:3]}, extra {extra[:3]}): merge only "
                             f"calibrations taken with the same --world, --quick and --ops-for")
        for k in a:
            _same_shape(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            raise ValueError(f"{where}: {len(a)} entries in the first calibration, "
                             f"{len(b) if isinstance(b, list) else 'none'} in another")
        for i, (x, y) in enumerate(zip(a, b)):
            _same_shape(x, y, f"{where}[{i}]")
    elif isinstance(a, (int, float)) != isinstance(b, (int, float)):
        raise ValueError(f"{where}: a number in one calibration, not in another")


def merge_profiles(profiles: list[dict], names: list[str] | None = None) -> dict:
    """A profile fitted from the median over `profiles` (calibrations of one host and
    device, each with its raw figures) of every raw figure; `names` (file names) are kept in
    `measurement.merged_from` beside each calibration's time and load. ValueError naming the
    file and the field when fewer than 2 profiles are given, one has no raw figures, or
    they differ in device, --quick, worlds or what they measured."""
    names = names or [f"profile {i + 1}" for i in range(len(profiles))]
    if len(profiles) < 2:
        raise ValueError(f"--merge: needs at least 2 calibrations, got {len(profiles)}")
    meas = []
    for name, p in zip(names, profiles):
        m = p.get("measurement") if isinstance(p, dict) else None
        if not isinstance(m, dict) or not isinstance(m.get("raw"), dict) or not m["raw"]:
            raise ValueError(f"--merge {name}: measurement.raw is missing: only profiles "
                             f"written by `workbench calibrate` carry the raw figures")
        meas.append(m)
    first = meas[0]
    for name, m in zip(names[1:], meas[1:]):
        for field in ("device", "quick", "host"):
            if m.get(field) != first.get(field):
                raise ValueError(f"--merge {name}: measurement.{field} is {m.get(field)!r}, "
                                 f"{names[0]} has {first.get(field)!r}: merge calibrations "
                                 f"of one host, device and --quick setting")
        _same_shape(first["raw"], m["raw"], f"--merge {name}: measurement.raw")
    raw = {w: merge_ranks([m["raw"][w] for m in meas]) for w in first["raw"]}
    worlds = tuple(sorted(int(w) for w in raw))
    settings = Settings(device=first["device"], worlds=worlds, quick=bool(first["quick"]))
    stamp = utc_stamp()
    merged_from = [{"file": name, "measured_at": m.get("measured_at"),
                    "load_average": m.get("load_average"), "host_check": m.get("host_check")}
                   for name, m in zip(names, meas)]
    host_world = (profiles[0].get("host_level") or {}).get("size")  # the calibrated host's
    profile = profile_from_raw(raw, settings, stamp, {
        "host": first.get("host"), "torch": first.get("torch"), "merged_from": merged_from},
        host_world=host_world if isinstance(host_world, int) else None)
    note = (f" Median of {len(meas)} calibrations' raw figures ("
            f"{', '.join(str(m['measured_at']) for m in merged_from)}), fitted {stamp} "
            f"(workbench calibrate --merge).")
    chips = {id(c): c for c in [profile["chip"]] + [w["chip"] for w in profile["worlds"]]}
    for chip in chips.values():  # the host's world is the top-level chip too
        chip["source"] += note
        chip["efficiency"]["source"] += note
    return profile


def merge_files(paths: list[str]) -> dict:
    """`merge_profiles` of the profile files at `paths` (ValueError naming an unreadable
    one)."""
    profiles = []
    for path in paths:
        try:
            profiles.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--merge {path}: cannot read it as a profile file ({e})") from e
    return merge_profiles(profiles, [str(p) for p in paths])
