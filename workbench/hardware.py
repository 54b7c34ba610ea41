"""The hardware catalog: chips, clusters and their named presets (DESIGN.md `hardware.py`).

The types and their TOML/JSON files live in `hardware_spec.py` (re-exported here); this
module holds the presets: chips (`data/chips.toml`), DGX clusters (`data/clusters.toml`) and
the `cpu` chip and cluster of this host's calibration file (`data/cpu.json`).
"""
from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path

__all__ = ["DTYPES", "Chip", "Level", "Cluster", "chip", "chip_for_nvml_name", "cluster",
           "list_presets", "load_chip", "save_chip", "load_cluster", "save_cluster",
           "load_cpu_chip", "load_cpu_cluster", "chip_from_dict", "chip_to_dict",
           "cluster_from_dict", "cluster_to_dict"]

from .hardware_spec import (DTYPES, Chip, Cluster, Level, _keys, _level_from_dict,  # noqa: F401
                            _num, chip_from_dict, chip_to_dict, cluster_from_dict,
                            cluster_to_dict, load_chip, load_cluster, save_chip, save_cluster,
                            tomllib)


# ----------------------------------------------------------------------------- chip presets

@functools.lru_cache(maxsize=None)
def _chip_presets() -> dict[str, Chip]:
    data = tomllib.loads(resources.files("workbench").joinpath("data/chips.toml").read_text())
    _keys(data, "chips.toml", ("chips",))
    chips = [chip_from_dict(d, f"chips.toml chips[{i}]") for i, d in enumerate(data["chips"])]
    return {c.name: c for c in chips}


def _cpu_file(path: str | Path | None) -> dict:
    """The calibration file, checked: `chip`, `host_level` and a free-form `measurement` record."""
    source = Path(path) if path is not None else resources.files("workbench") / "data/cpu.json"
    data = json.loads(source.read_text())
    _keys(data, f"{path or 'cpu.json'}", ("chip", "host_level", "measurement"))
    if not isinstance(data["measurement"], dict):
        raise ValueError(f"{path or 'cpu.json'}: measurement must be a table/object")
    return data


def load_cpu_chip(path: str | Path | None = None) -> Chip:
    """The `cpu` chip (one rank = one process with one torch thread) from a calibration file.

    Reads `workbench/data/cpu.json` by default, or a user's file in the same format."""
    return chip_from_dict(_cpu_file(path)["chip"], f"{path or 'cpu.json'}: chip")


def load_cpu_cluster(n_chips: int | None = None, path: str | Path | None = None) -> Cluster:
    """`n_chips` processes on this host over loopback gloo (default: one per measured core)."""
    data, where = _cpu_file(path), path or "cpu.json"
    level = _level_from_dict(data["host_level"], f"{where}: host_level")
    n = level.size if n_chips is None else _num(n_chips, "n_chips", integer=True)
    if n > level.size:
        raise ValueError(f"cpu cluster: n_chips ({n}) must be <= {level.size}, the cores of the "
                         f"calibrated host (one rank per core); recalibrate on a bigger host")
    return Cluster(name="cpu", chip=chip_from_dict(data["chip"], f"{where}: chip"), levels=(level,),
                   n_chips=n, source=f"one host, processes over loopback gloo; {level.source}")


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
        cl = load_cluster(spec)
        return cl if cl.n_chips == n_chips else cl.with_n_chips(n_chips)
    return cluster(spec, n_chips)


def list_presets() -> dict[str, tuple[str, ...]]:
    """Names of the chip and cluster presets: {'chips': (...), 'clusters': (...)}."""
    return {"chips": (*_chip_presets(), "cpu"), "clusters": (*_cluster_presets(), "cpu")}
