"""Pipeline-parallel schedules as the exact order of forward and backward ops on each stage.

A schedule is a list of `Op`s per pipeline stage; the simulator runs each stage's list in
order, starting an op once the ops it depends on (see `dependencies`) have finished. Three
schedules are supported:

- ``gpipe`` (Huang et al. 2019, "GPipe"): every forward, then every backward. Backwards run in
  ascending microbatch order, as in PyTorch's `torch.distributed.pipelining.ScheduleGPipe`.
- ``1f1b`` (PipeDream-Flush; Narayanan et al. 2021, "Memory-Efficient Pipeline-Parallel DNN
  Training"): ``min(pp - stage - 1, m)`` warm-up forwards, then one forward / one backward
  pairs, then the remaining backwards; as Megatron-LM's
  `forward_backward_pipelining_without_interleaving`.
- ``interleaved-1f1b`` (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training
  on GPU Clusters Using Megatron-LM", Sec. 2.2): each stage holds ``vpp`` model chunks; the
  order is Megatron-LM's `forward_backward_pipelining_with_interleaving`
  (`megatron/core/pipeline_parallel/schedules.py`, `get_pp_rank_microbatches` and
  `get_schedule_table` with the default ``microbatch_group_size_per_vp_stage = pp``).

Chunk ``c`` on stage ``s`` is virtual stage ``c * pp + s``: the model's layers are cut into
``pp * vpp`` pieces and dealt round-robin to the stages.
"""
from __future__ import annotations

from typing import NamedTuple

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
"""Schedule names accepted by `stage_order`."""


class Op(NamedTuple):
    """One forward or backward pass of one microbatch through one model chunk of a stage."""

    kind: str
    """Either "F" (forward) or "B" (backward)."""
    microbatch: int
    """Microbatch index, 0..m-1."""
    chunk: int
    """Model chunk on this stage, 0..vpp-1; its virtual stage is ``chunk * pp + stage``."""

    @property
    def label(self) -> str:
        """Short display name, e.g. ``"F mb3 c0"`` (used as a timeline event name)."""
        return f"{self.kind} mb{self.microbatch} c{self.chunk}"


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"schedule: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"schedule: {name} must be >= {minimum}, got {value}")


def _check_stage(stage: int, pp: int, vpp: int) -> None:
    _check_int("pp", pp, 1)
    _check_int("vpp", vpp, 1)
    _check_int("stage", stage, 0)
    if stage >= pp:
        raise ValueError(f"schedule: stage must be in 0..pp-1 = 0..{pp - 1}, got {stage}")


def validate(schedule: str, stage: int, pp: int, vpp: int, m: int) -> None:
    """Raise ValueError naming the field and rule if the arguments make no valid schedule."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: schedule must be one of {SCHEDULES}, got {schedule!r}")
    _check_stage(stage, pp, vpp)
    _check_int("m", m, 1)
    if schedule == "interleaved-1f1b":
        if vpp < 2:
            raise ValueError(
                f"schedule: vpp must be >= 2 for 'interleaved-1f1b', got {vpp} (use '1f1b' for vpp=1)"
            )
        if m % pp:
            raise ValueError(
                f"schedule: m ({m}) must be divisible by pp ({pp}) for 'interleaved-1f1b' "
                "(Megatron-LM interleaved schedule rule)"
            )
    elif vpp != 1:
        raise ValueError(
            f"schedule: vpp must be 1 for {schedule!r}, got {vpp} (use 'interleaved-1f1b' for vpp > 1)"
        )


def virtual_stage(stage: int, chunk: int, pp: int) -> int:
    """Virtual pipeline stage of model chunk `chunk` on stage `stage`: ``chunk * pp + stage``."""
    _check_int("pp", pp, 1)
    _check_int("chunk", chunk, 0)
    _check_int("stage", stage, 0)
    if stage >= pp:
        raise ValueError(f"schedule: stage must be in 0..pp-1 = 0..{pp - 1}, got {stage}")
    return chunk * pp + stage


def stage_and_chunk(virtual: int, pp: int) -> tuple[int, int]:
    """Inverse of `virtual_stage`: the (stage, chunk) that holds virtual stage `virtual`."""
    _check_int("pp", pp, 1)
    _check_int("virtual", virtual, 0)
    return virtual % pp, virtual // pp


def warmup_forwards(schedule: str, stage: int, pp: int, vpp: int, m: int) -> int:
    """Forwards that `stage` runs before its first backward (all m * vpp for gpipe)."""
    validate(schedule, stage, pp, vpp, m)
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(pp - stage - 1, m)
    # Megatron-LM get_pp_rank_microbatches: (pp - rank - 1) * 2 + (vpp - 1) * group, group = pp.
    return min((pp - stage - 1) * 2 + (vpp - 1) * pp, m * vpp)


def _interleaved_op(kind: str, k: int, pp: int, vpp: int) -> Op:
    """The k-th forward (or backward) of a stage in Megatron-LM's interleaved table.

    Microbatches go in groups of pp: the table runs group g through chunk 0, then chunk 1, ...,
    then group g + 1. Backwards walk the chunks in reverse. (Megatron-LM: get_schedule_table,
    get_model_chunk_id.)
    """
    chunk = (k // pp) % vpp
    if kind == "B":
        chunk = vpp - 1 - chunk
    microbatch = (k // (pp * vpp)) * pp + k % pp
    return Op(kind, microbatch, chunk)


def stage_order(schedule: str, stage: int, pp: int, vpp: int, m: int) -> list[Op]:
    """The ops pipeline stage `stage` runs, in order, for one step of `m` microbatches.

    Each stage runs every (F, microbatch, chunk) and (B, microbatch, chunk) exactly once.
    """
    validate(schedule, stage, pp, vpp, m)
    if schedule == "gpipe":
        return [Op("F", i, 0) for i in range(m)] + [Op("B", i, 0) for i in range(m)]
    warmup = warmup_forwards(schedule, stage, pp, vpp, m)
    total = m * vpp
    if schedule == "1f1b":
        def fwd(k: int) -> Op:
            return Op("F", k, 0)

        def bwd(k: int) -> Op:
            return Op("B", k, 0)
    else:
        def fwd(k: int) -> Op:
            return _interleaved_op("F", k, pp, vpp)

        def bwd(k: int) -> Op:
            return _interleaved_op("B", k, pp, vpp)
    order = [fwd(k) for k in range(warmup)]
    steady = total - warmup
    for k in range(steady):  # one forward, then one backward
        order.append(fwd(warmup + k))
        order.append(bwd(k))
    order.extend(bwd(k) for k in range(steady, total))  # cool-down
    return order


def dependencies(op: Op, stage: int, pp: int, vpp: int) -> list[tuple[int, Op]]:
    """The (stage, op) pairs that must finish before `op` can start on `stage`.

    A forward needs the same microbatch's forward on the previous virtual stage; a backward
    needs the same microbatch's backward on the next virtual stage and its own forward. The
    first virtual stage's forward and the last one's backward (after its own forward) need
    nothing else. Point-to-point transfer time is the caller's to add.
    """
    _check_stage(stage, pp, vpp)
    if op.kind not in ("F", "B"):
        raise ValueError(f"schedule: op.kind must be 'F' or 'B', got {op.kind!r}")
    if not 0 <= op.chunk < vpp:
        raise ValueError(f"schedule: op.chunk must be in 0..vpp-1 = 0..{vpp - 1}, got {op.chunk}")
    _check_int("op.microbatch", op.microbatch, 0)
    v = virtual_stage(stage, op.chunk, pp)
    if op.kind == "F":
        if v == 0:
            return []
        prev_stage, prev_chunk = stage_and_chunk(v - 1, pp)
        return [(prev_stage, Op("F", op.microbatch, prev_chunk))]
    deps = [(stage, Op("F", op.microbatch, op.chunk))]
    if v < pp * vpp - 1:
        next_stage, next_chunk = stage_and_chunk(v + 1, pp)
        deps.append((next_stage, Op("B", op.microbatch, next_chunk)))
    return deps


def peak_in_flight(order: list[Op]) -> int:
    """Most (microbatch, chunk) forwards held at once awaiting their backward (activation
    memory is this times one chunk's saved activations)."""
    held = 0
    peak = 0
    for op in order:
        held += 1 if op.kind == "F" else -1
        peak = max(peak, held)
    return peak
