"""Shared by the cost-model tests that change a calibrated figure: a cluster whose chip's
efficiency table has some entries replaced."""
from __future__ import annotations

import dataclasses

from workbench.costmodel.efficiency import efficiency_for, efficiency_to_dict
from workbench.hardware import chip_from_dict, chip_to_dict


def with_efficiency(cluster, **figures):
    """`cluster` with its chip's efficiency entries set to `figures` (None drops an entry,
    e.g. `model_passes_s=None` for the op-level prediction alone)."""
    chip = chip_to_dict(cluster.chip)
    eff = {**efficiency_to_dict(efficiency_for(cluster.chip)), **figures}
    chip["efficiency"] = {k: v for k, v in eff.items() if v is not None}
    return dataclasses.replace(cluster, chip=chip_from_dict(chip, "test chip"))
