"""The hardware catalog: chips, clusters and their named presets (DESIGN.md `hardware.py`).

The types and their TOML/JSON files live in `hardware_spec.py` (re-exported here); this
module holds the presets: chips (`data/chips.toml`), DGX clusters (`data/clusters.toml`) and
the `cpu` chip and cluster of this host's calibration file (`data/cpu.json`, written by
`workbench calibrate`).

A calibration file holds `chip` and `host_level` (measured with one rank per core: the
default `cpu` cluster), an optional `worlds` list of the same figures measured with `ranks`
concurrent processes (more ranks than cores share them: each rank computes slower, and
collectives wait on the scheduler), and a free-form `measurement` record.
"""
from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path

__all__ = ["DTYPES", "Chip", "Level", "Cluster", "chip", "chip_for_nvml_name", "cluster",
           "list_presets", "load_chip", "save_chip", "load_cluster", "save_cluster",
           "load_cpu_chip", "load_cpu_cluster", "cpu_cluster_from_data", "check_cpu_data",
           "calibrated_worlds", "is_calibration_file",
           "chip_from_dict", "chip_to_dict",
           "cluster_from_dict", "cluster_to_dict"]

from . import hardware_spec
from .hardware_spec import (DTYPES, Chip, Cluster, Level, _keys, _level_from_dict,  # noqa: F401
                            _num, chip_from_dict, chip_to_dict, cluster_from_dict,
                            cluster_to_dict, load_chip, save_chip, save_cluster, tomllib)


# ----------------------------------------------------------------------------- chip presets

@functools.lru_cache(maxsize=None)
def _chip_presets() -> dict[str, Chip]:
    data = tomllib.loads(resources.files("workbench").joinpath("data/chips.toml").read_text())
    _keys(data, "chips.toml", ("chips",))
    chips = [chip_from_dict(d, f"chips.toml chips[{i}]") for i, d in enumerate(data["chips"])]
    return {c.name: c for c in chips}


def _cpu_file(path: str | Path | None) -> dict:
    """The calibration file, checked: `chip`, `host_level`, optional `worlds` and a free-form
    `measurement` record."""
    source = Path(path) if path is not None else resources.files("workbench") / "data/cpu.json"
    return check_cpu_data(json.loads(source.read_text()), f"{path or 'cpu.json'}")


def check_cpu_data(data: dict, where: str = "profile") -> dict:
    """A calibration profile's contents (`data`, read from `where`), checked: `chip`,
    `host_level`, optional `worlds` and a free-form `measurement` record."""
    _keys(data, where, ("chip", "host_level", "measurement"), ("worlds",))
    if not isinstance(data["measurement"], dict):
        raise ValueError(f"{where}: measurement must be a table/object")
    worlds = data.get("worlds", [])
    if not isinstance(worlds, list):
        raise ValueError(f"{where}: worlds must be a list of {{ranks, chip, level}} tables")
    seen = set()
    for i, w in enumerate(worlds):
        _keys(w, f"{where}: worlds[{i}]", ("ranks", "chip", "level"))
        ranks = _num(w["ranks"], f"{where}: worlds[{i}].ranks", integer=True)
        if ranks < 1 or ranks in seen:
            raise ValueError(f"{where}: worlds[{i}].ranks must be >= 1 and unique, got {ranks}")
        seen.add(ranks)
    return data


def load_cpu_chip(path: str | Path | None = None) -> Chip:
    """The `cpu` chip (one rank = one process with one torch thread) from a calibration file.

    Reads `workbench/data/cpu.json` by default, or a user's file in the same format."""
    return chip_from_dict(_cpu_file(path)["chip"], f"{path or 'cpu.json'}: chip")


def calibrated_worlds(path: str | Path | None = None) -> tuple[int, ...]:
    """World sizes a calibration file has figures for (its `worlds` entries)."""
    return tuple(sorted(w["ranks"] for w in _cpu_file(path).get("worlds", [])))


def load_cpu_cluster(n_chips: int | None = None, path: str | Path | None = None) -> Cluster:
    """`n_chips` processes on this host over loopback gloo (default: one per measured core).

    Uses the figures measured with exactly `n_chips` concurrent ranks when the file has them
    (`worlds`), else the one-rank-per-core figures for up to as many ranks as cores."""
    return cpu_cluster_from_data(_cpu_file(path), n_chips, f"{path or 'cpu.json'}")


def cpu_cluster_from_data(data: dict, n_chips: int | None = None,
                          where: str = "profile") -> Cluster:
    """`load_cpu_cluster` of a profile already read (and checked: `check_cpu_data`)."""
    level = _level_from_dict(data["host_level"], f"{where}: host_level")
    n = level.size if n_chips is None else _num(n_chips, "n_chips", integer=True)
    for i, w in enumerate(data.get("worlds", [])):
        if w["ranks"] == n:
            wl = _level_from_dict(w["level"], f"{where}: worlds[{i}].level")
            if wl.size != n:
                raise ValueError(f"{where}: worlds[{i}].level.size ({wl.size}) must equal "
                                 f"worlds[{i}].ranks ({n})")
            chip_ = chip_from_dict(w["chip"], f"{where}: worlds[{i}].chip")
            return Cluster(name=chip_.name, chip=chip_, levels=(wl,), n_chips=n,
                           source=f"{n} processes on one host over loopback gloo, measured "
                                  f"together; {wl.source}")
    if n > level.size:
        extra = sorted(w["ranks"] for w in data.get("worlds", []))
        raise ValueError(f"cpu cluster: n_chips ({n}) must be <= {level.size}, the cores of the "
                         f"calibrated host (one rank per core)"
                         + (f", or a world size calibrated with shared cores "
                            f"({', '.join(map(str, extra))})" if extra else "")
                         + f"; recalibrate (workbench calibrate --world {n})")
    host_chip = chip_from_dict(data["chip"], f"{where}: chip")
    return Cluster(name=host_chip.name, chip=host_chip, levels=(level,), n_chips=n,
                   source=f"one host, processes over loopback gloo; {level.source}")


def is_calibration_file(path: str | Path) -> bool:
    """True for a `workbench calibrate` profile (a .json with `chip` and `host_level`)."""
    path = Path(path)
    if path.suffix != ".json" or not path.exists():
        return False
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return False
    return isinstance(data, dict) and "host_level" in data and "chip" in data


def load_cluster(path: str | Path, n_chips: int | None = None) -> Cluster:
    """Read a cluster file: a cluster table (`save_cluster`'s format, TOML or JSON), or a
    calibration profile (`workbench calibrate`), whose world of `n_chips` ranks it returns
    (default: one rank per calibrated core). `n_chips` resizes a cluster table's cluster."""
    if is_calibration_file(path):
        return load_cpu_cluster(n_chips, path=path)
    cl = hardware_spec.load_cluster(path)
    return cl if n_chips is None or n_chips == cl.n_chips else cl.with_n_chips(n_chips)


def chip(name: str) -> Chip:
    """A chip preset by name (`cpu` reads the default calibration file)."""
    if name == "cpu":
        return load_cpu_chip()
    presets = _chip_presets()
    if name not in presets:
        raise ValueError(f"unknown chip {name!r} (presets: {', '.join(list_presets()['chips'])})")
    return presets[name]


def chip_for_nvml_name(name: str | bytes) -> Chip:
    """The chip preset whose NVML names include `name`; ValueError for an unknown device.

    Matching ignores case, a leading "NVIDIA "/"Tesla " and '-'/'_' vs spaces, and nothing
    else: an unlisted part (PCIe, NVL, H800, ...) is an error, never a guess."""
    for c in _chip_presets().values():
        if c.matches_nvml_name(name):
            return c
    known = sorted(n for c in _chip_presets().values() for n in c.nvml_names)
    raise ValueError(f"unknown NVML device name {name!r}: no chip preset lists it (known: "
                     f"{', '.join(known)}); describe the chip in a file and use load_chip()")


# ----------------------------------------------------------------------------- cluster presets

@functools.lru_cache(maxsize=None)
def _cluster_presets() -> dict[str, Cluster]:
    data = tomllib.loads(resources.files("workbench").joinpath("data/clusters.toml").read_text())
    _keys(data, "clusters.toml", ("clusters",))
    clusters = [cluster_from_dict(d, f"clusters.toml clusters[{i}]")
                for i, d in enumerate(data["clusters"])]
    return {c.name: c for c in clusters}


def cluster(preset: str, n_chips: int | None = None) -> Cluster:
    """`n_chips` chips (default: one node) of a cluster preset (see `Cluster.with_n_chips`).

    DGX presets: node (8 GPUs on NVLink) -> rack (one DGX SuperPOD scalable unit) -> cluster
    (the non-blocking spine, as many whole scalable units as `n_chips` needs)."""
    if preset == "cpu":
        return load_cpu_cluster(n_chips)
    if preset not in _cluster_presets():
        raise ValueError(f"unknown cluster preset {preset!r} "
                         f"(presets: {', '.join(list_presets()['clusters'])})")
    base = _cluster_presets()[preset]
    return base if n_chips is None else base.with_n_chips(n_chips)


def resolve_cluster(spec: str, n_chips: int) -> Cluster:
    """A cluster preset name (or `cpu`) or a cluster file (.toml/.json), at `n_chips` chips."""
    if str(spec).endswith((".toml", ".json")):
        if is_calibration_file(spec):  # the figures measured for n_chips ranks
            return load_cpu_cluster(n_chips, path=spec)
        cl = load_cluster(spec)
        return cl if cl.n_chips == n_chips else cl.with_n_chips(n_chips)
    return cluster(spec, n_chips)


def list_presets() -> dict[str, tuple[str, ...]]:
    """Names of the chip and cluster presets: {'chips': (...), 'clusters': (...)}."""
    return {"chips": (*_chip_presets(), "cpu"), "clusters": (*_cluster_presets(), "cpu")}
