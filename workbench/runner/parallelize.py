"""Apply a Plan to a model: mesh, CP, TP (+SP), EP, pipeline split, checkpointing, compile,
FSDP / HSDP / DDP, in torchtitan's order, one small function per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..plan import Plan
from ..stages import virtual_stage_units
from . import families
from .pipeline_parts import StageSequential, pipeline_parts

MESH_NAMES = {"tp": "tp", "cp": "cp", "fsdp": "dp_shard", "dp": "dp_replicate", "pp": "pp"}
"""Plan mesh dimensions -> torch DeviceMesh dimension names (torchtitan's)."""


def build_mesh(plan: Plan, device_type: str) -> DeviceMesh:
    """The device mesh of a plan, outermost dimension first (the reverse of `plan.order`),
    with the flattened groups data parallelism needs."""
    dims = list(reversed(plan.order.split("-")))
    mesh = init_device_mesh(device_type, tuple(plan.degree(d) for d in dims),
                            mesh_dim_names=tuple(MESH_NAMES[d] for d in dims))
    mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
    return mesh


@dataclass
class Parallel:
    """What the training loop drives: the local modules and, with PP, the schedule."""

    model: nn.Module
    """The whole (TP/EP/CP-transformed) model; with PP, only its stage parts hold this
    rank's trained weights."""
    modules: list[nn.Module]
    """Modules whose parameters this rank trains (the stage chunks with PP)."""
    schedule: object | None = None
    """torch.distributed.pipelining schedule (None without PP)."""
    ddp: nn.Module | None = None
    """The DDP wrapper (plain data parallelism)."""
    expert_params: list = None
    """Expert weights (EP): FSDP leaves them alone; `sync_expert_grads` averages them."""
    expert_replicas: dist.ProcessGroup | None = None
    """Ranks that hold the same experts (data-parallel replicas of an EP group)."""
    data_parallel_degree: int = 1
    """How many data shards the loss is averaged over (dp x fsdp x cp)."""
    loss_scale: float = 1.0
    """Factor on this rank's loss (context-parallel ViT: only the class token's rank)."""
    first_stage: bool = True
    last_stage: bool = True
    torch_cp: object | None = None
    """With `cp_impl="torch"`: a zero-argument factory of PyTorch's `context_parallel`
    context, entered around each step (it patches SDPA with its ring attention)."""


def apply_cp(model: nn.Module, plan: Plan, mesh: DeviceMesh, impl: str = "ring") -> float:
    """Context parallel: ring attention in every attention module, positions offset.

    Token models get their sequence shard as input. A ViT embeds the whole image on every CP
    rank and keeps its slice of the tokens from the first block on; only the rank holding the
    class token (CP rank 0) computes the loss. Returns the factor this rank's loss is scaled
    by so that averaging gradients over the CP ranks gives the one-process gradient (1, or
    cp on CP rank 0 and 0 elsewhere for the ViT).
    """
    if plan.cp == 1:
        return 1.0
    from .ring_attention import ring_attention
    group = mesh["cp"].get_group()
    rank, world = mesh["cp"].get_local_rank(), plan.cp
    if impl not in ("ring", "torch"):
        raise ValueError(f"cp_impl must be 'ring' or 'torch', not {impl!r}")
    for m in model.modules():
        if hasattr(m, "attention_fn"):
            m.attention_fn = partial(_ring_sdpa, ring_attention, group) if impl == "ring" \
                else _patched_sdpa
    if hasattr(model, "rope_cos"):  # Llama: this rank's slice of the rotary tables
        s = model.cfg.seq // world
        model.rope_cos = model.rope_cos[rank * s:(rank + 1) * s]
        model.rope_sin = model.rope_sin[rank * s:(rank + 1) * s]
    if hasattr(model, "position_offset"):
        model.position_offset = rank * model.cfg.seq // world
    from ..models.vit import VisionTransformer
    if isinstance(model, VisionTransformer):
        if plan.pp > 1:
            raise ValueError("context parallel ViT with pipeline parallel is not supported")
        s = model.cfg.seq // world

        def keep_shard(module, args):
            return (args[0][:, rank * s:(rank + 1) * s],) + tuple(args[1:])
        model.encoder.layers[0].register_forward_pre_hook(keep_shard)
        return float(world) if rank == 0 else 0.0
    return 1.0


def torch_cp_context(plan: Plan, mesh: DeviceMesh, seq: int):
    """PyTorch's `context_parallel` for this plan (CUDA attention kernels only).

    Load balancing is switched off so its shards are contiguous, like our ring attention's:
    the batch, rotary tables and positions are already this rank's slice. The one buffer it
    shards is the full position index, which it cuts into the same contiguous slice.
    """
    if mesh.device_type != "cuda":
        raise ValueError("cp_impl='torch' needs CUDA: PyTorch's context_parallel only shards "
                         "CUDA attention kernels (use cp_impl='ring' on CPU)")
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import _cp_options
    _cp_options.enable_load_balance = False
    cp_mesh = mesh["cp"]

    def enter():
        positions = torch.arange(seq, device="cuda")
        return context_parallel(cp_mesh, buffers=[positions], buffer_seq_dims=[0],
                                no_restore_buffers={positions})
    return enter


def _patched_sdpa(*args, **kwargs):
    """SDPA looked up at call time, so PyTorch's context_parallel patch takes effect."""
    return torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)


_IN_ATTENTION = [0]
"""Depth of ring-attention calls in progress: selective checkpointing recomputes every op
they run (their sends and receives fill buffers in place, which must not be cached)."""


def _ring_sdpa(ring, group, q, k, v, is_causal=False, dropout_p=0.0, enable_gqa=False, **_):
    if dropout_p:
        raise ValueError("context parallel ring attention has no attention dropout")
    _IN_ATTENTION[0] += 1
    try:
        return ring(q, k, v, group, causal=is_causal)
    finally:
        _IN_ATTENTION[0] -= 1


def apply_tp(model: nn.Module, plan: Plan, mesh: DeviceMesh) -> None:
    """Tensor parallel (and sequence parallel) from the family's TP plan."""
    if plan.tp == 1:
        return
    from torch.distributed.tensor.parallel import parallelize_module
    parallelize_module(model, mesh["tp"], families.tp_plan(model, plan.sequence_parallel))
    families.retie(model)


def apply_ep(model: nn.Module, plan: Plan, mesh: DeviceMesh) -> None:
    """Expert parallel: every MoE layer's experts split over ep ranks of fsdp x cp."""
    if plan.ep == 1:
        return
    from ..models.moe import MoE
    from .expert_parallel import apply_expert_parallel
    group = ep_group(plan, mesh)
    for m in model.modules():
        if isinstance(m, MoE):
            apply_expert_parallel(m, group)


def ep_group(plan: Plan, mesh: DeviceMesh) -> dist.ProcessGroup:
    """This rank's EP group: consecutive blocks of ep ranks of the dp_shard x cp group."""
    shard = mesh["dp_shard_cp"]
    ranks = dist.get_process_group_ranks(shard.get_group())
    mine = ranks.index(dist.get_rank())
    groups = [ranks[i:i + plan.ep] for i in range(0, len(ranks), plan.ep)]
    # new_group is collective over the world: every rank creates every EP group of every
    # shard group, in the same order.
    world = dist.get_world_size()
    all_ranks = [None] * world
    dist.all_gather_object(all_ranks, groups)
    made = {}
    for gs in all_ranks:
        for g in gs:
            key = tuple(g)
            if key not in made:
                made[key] = dist.new_group(list(key))
    return made[tuple(groups[mine // plan.ep])]


def apply_checkpointing(unit: nn.Module, mode: str) -> nn.Module:
    """Activation checkpointing of one unit: `full` reruns its forward in backward,
    `selective` reruns only the attention kernels (everything else is saved)."""
    if mode == "none":
        return unit
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    if mode == "full":
        return checkpoint_wrapper(unit)
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
    recompute = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
                 torch.ops.aten._scaled_dot_product_efficient_attention.default,
                 torch.ops.aten._scaled_dot_product_flash_attention.default}

    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
            aten.convolution.default}

    def policy(ctx, op, *args, **kwargs):
        # Save the matmul outputs (the costly activations); recompute the attention kernels
        # (and everything ring attention runs) and the cheap elementwise ops around them.
        # Views and elementwise results are not cached: FSDP reuses parameter storage.
        if op in recompute or _IN_ATTENTION[0] or op not in save:
            return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE
    return checkpoint_wrapper(unit, context_fn=partial(create_selective_checkpoint_contexts,
                                                       policy))


def sync_expert_grads(par: "Parallel") -> None:
    """Average expert gradients as FSDP averages the others: sum over the ranks holding the
    same experts, divide by every data shard that contributed tokens (dp x fsdp x cp)."""
    if not par.expert_params:
        return
    for p in par.expert_params:
        if p.grad is None:
            continue
        if par.expert_replicas is not None:
            dist.all_reduce(p.grad, group=par.expert_replicas)
        p.grad.div_(par.data_parallel_degree)


def _expert_setup(model: nn.Module, plan: Plan, mesh: DeviceMesh):
    """Expert parameters and the group of ranks that hold the same experts: the ranks of this
    rank's data-parallel group (dp x fsdp x cp) at the same position in their EP group."""
    from ..models.moe import Experts
    params = [p for m in model.modules() if isinstance(m, Experts) for p in m.parameters()]
    if plan.ep == 1 or not params:
        return [], None
    shard = dist.get_process_group_ranks(mesh["dp_shard_cp"].get_group())
    data = tuple(dist.get_process_group_ranks(mesh["dp_cp"].get_group()))
    me = (dist.get_rank(), data, shard.index(dist.get_rank()) % plan.ep)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)  # new_group is collective: all ranks, same order
    groups = sorted({(d, k) for _, d, k in everyone})
    mine = None
    for d, k in groups:
        ranks = sorted(r for r, dd, kk in everyone if dd == d and kk == k)
        g = dist.new_group(ranks) if len(ranks) > 1 else None
        if (d, k) == (data, me[2]):
            mine = g
    return params, mine


def apply_data_parallel(modules: list[nn.Module], units: list[nn.Module], plan: Plan,
                        mesh: DeviceMesh, counter=None, ignored: set | None = None):
    """FSDP2 (per unit, then each root) over dp_shard x cp, HSDP when dp_replicate > 1 too;
    plain DDP when nothing else splits the model. Returns the DDP wrapper or None."""
    if plan.zero in (1, 2):
        raise ValueError(f"zero={plan.zero} over plain data parallelism is not supported by the "
                         f"runner (use fsdp, or zero=3)")
    needs_fsdp = (plan.dp_shard > 1 or plan.cp > 1 or plan.zero == 3
                  or (plan.dp_replicate > 1 and (plan.tp > 1 or plan.pp > 1 or plan.ep > 1)))
    if needs_fsdp:
        from torch.distributed.fsdp import fully_shard
        if plan.zero == 3:  # ZeRO-3 = every data-parallel rank shards (FSDP over dp x cp)
            dp_mesh = mesh["dp_cp"]
        else:
            dp_mesh = (mesh["dp_replicate", "dp_shard_cp"] if plan.dp_replicate > 1
                       else mesh["dp_shard_cp"])
        for unit in units:
            fully_shard(unit, mesh=dp_mesh, ignored_params=ignored or None)
        for m in modules:
            fully_shard(m, mesh=dp_mesh, ignored_params=ignored or None)
        return None
    if plan.dp_replicate > 1:
        if len(modules) != 1:
            raise ValueError("plain DDP wraps one module")
        ddp = wrap_ddp(modules[0], mesh["dp_cp"].get_group())
        if counter is not None:
            from .comm_counter import ddp_counting_hook
            ddp.register_comm_hook(mesh["dp_cp"].get_group(), ddp_counting_hook(counter))
        return ddp
    return None


def wrap_ddp(module: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """`module` in DDP over `group` (None: the default group) as the runner's plans run it,
    and the calibration's DDP model with them: buffers not broadcast (they are constants:
    rotary tables), gradients as views of the buckets (no second copy)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    import warnings
    with warnings.catch_warnings():  # the replacement keeps syncing buffers at init
        warnings.simplefilter("ignore", FutureWarning)
        return DDP(module, process_group=group, broadcast_buffers=False,
                   gradient_as_bucket_view=True)


def parallelize(model: nn.Module, plan: Plan, mesh: DeviceMesh, device: torch.device,
                compile: bool = False, counter=None, cp_impl: str = "ring") -> Parallel:
    """The whole plan, in order: CP, TP, EP on the full model; the pipeline split; then per
    unit activation checkpointing and compile; then FSDP/HSDP or DDP."""
    torch_cp = None
    if plan.cp > 1 and cp_impl == "torch":
        from ..models.vit import VisionTransformer
        if isinstance(model, VisionTransformer):
            raise ValueError("cp_impl='torch' supports token models (Llama, GPT, MoE), not ViT")
        torch_cp = torch_cp_context(plan, mesh, model.cfg.seq)
    loss_scale = apply_cp(model, plan, mesh, cp_impl)
    apply_tp(model, plan, mesh)
    apply_ep(model, plan, mesh)
    if plan.recompute == "selective" and not any(hasattr(m, "attention_fn")
                                                 for m in model.modules()):
        import dataclasses  # selective recompute reruns attention kernels: none here
        plan = dataclasses.replace(plan, recompute="none")
    experts, replicas = _expert_setup(model, plan, mesh)
    ignored = set(experts)
    dp = plan.dp_degree * plan.cp
    if plan.pp == 1:
        units = _wrap_units(model, plan, compile) or _part_groups(model)
        ddp = apply_data_parallel([model], units, plan, mesh, counter, ignored)
        return Parallel(model, [model], ddp=ddp, expert_params=experts,
                        expert_replicas=replicas, data_parallel_degree=dp, loss_scale=loss_scale,
                        torch_cp=torch_cp)
    pre, all_units, post = pipeline_parts(model)
    stage = mesh["pp"].get_local_rank()
    chunks = virtual_stage_units(len(all_units), plan.pp, plan.vpp)
    stage_modules, pipeline_stages = [], []
    from torch.distributed.pipelining import PipelineStage
    for chunk in range(plan.vpp):
        v = chunk * plan.pp + stage
        parts = [_maybe(apply_checkpointing(all_units[u], plan.recompute), compile)
                 for u in chunks[v]]
        seq = StageSequential(*([pre] if v == 0 else []), *parts,
                                       *([post] if v == plan.pp * plan.vpp - 1 else []))
        stage_modules.append((seq, parts))
    for seq, parts in stage_modules:
        apply_data_parallel([seq], parts, plan, mesh, ignored=ignored)
    for chunk, (seq, _) in enumerate(stage_modules):
        v = chunk * plan.pp + stage
        pipeline_stages.append(PipelineStage(seq, v, plan.pp * plan.vpp, device,
                                             group=mesh["pp"].get_group()))
    schedule = _schedule(plan, pipeline_stages)
    owned = {id(p) for s, _ in stage_modules for p in s.parameters()}
    return Parallel(model, [s for s, _ in stage_modules], schedule=schedule,
                    first_stage=stage == 0, last_stage=stage == plan.pp - 1,
                    expert_params=[p for p in experts if id(p) in owned],
                    expert_replicas=replicas, data_parallel_degree=dp, torch_cp=torch_cp)


def _schedule(plan: Plan, stages):
    from torch.distributed.pipelining import (Schedule1F1B, ScheduleGPipe,
                                              ScheduleInterleaved1F1B)

    def loss_fn(output, target):
        return families.loss(output, target)
    m = plan.microbatches
    if plan.schedule == "interleaved-1f1b":
        return ScheduleInterleaved1F1B(stages, n_microbatches=m, loss_fn=loss_fn)
    cls = ScheduleGPipe if plan.schedule == "gpipe" else Schedule1F1B
    return cls(stages[0], n_microbatches=m, loss_fn=loss_fn)


def _maybe(unit: nn.Module, compile: bool) -> nn.Module:
    return torch.compile(unit) if compile else unit


def _wrap_units(model: nn.Module, plan: Plan, compile: bool) -> list[nn.Module]:
    """Checkpoint (and compile) each repeated unit in place; return the units."""
    for holder, name in _unit_slots(model):
        unit = getattr(holder, name) if not isinstance(holder, nn.ModuleList) else holder[int(name)]
        wrapped = _maybe(apply_checkpointing(unit, plan.recompute), compile)
        if isinstance(holder, nn.ModuleList):
            holder[int(name)] = wrapped
        else:
            setattr(holder, name, wrapped)
    return [holder[int(n)] if isinstance(holder, nn.ModuleList) else getattr(holder, n)
            for holder, n in _unit_slots(model)]


def _part_groups(model: nn.Module) -> list[list[nn.Module]]:
    """FSDP groups for models without repeated blocks (VGG, AlexNet, U-Net, FCN, C3D, YOLO,
    DETR, ...): one group per unit of the pipeline split (the layer graph's units), made of
    the model's own submodules that unit runs (the split's wrappers are never called by the
    model's forward, so they cannot carry FSDP's hooks). Empty where there is no split."""
    from .pipeline_parts import pipeline_parts
    try:
        _, units, _ = pipeline_parts(model)
    except ValueError:
        return []
    own = {id(m) for m in model.modules()} - {id(model)}
    claimed: set[int] = set()
    groups = []
    for unit in units:
        group = [m for m in _own_children(unit, own) if id(m) not in claimed
                 and any(p.requires_grad for p in m.parameters())]
        claimed.update(id(m) for m in group)
        if group:
            groups.append(group)
    return groups


def _own_children(module: nn.Module, own: set[int]) -> list[nn.Module]:
    """The outermost submodules of `module` that belong to the model (`own` ids), looking
    through the split's own containers (a unit's ModuleList of the model's layers)."""
    found = []
    for child in module.children():
        found += [child] if id(child) in own else _own_children(child, own)
    return found


def _unit_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(container, key) of each repeated unit: transformer blocks, residual blocks."""
    for name in ("layers", "h", "blocks"):
        container = getattr(model, name, None)
        if isinstance(container, nn.ModuleList):
            return [(container, str(i)) for i in range(len(container))]
    encoder = getattr(model, "encoder", None)
    if encoder is not None and isinstance(getattr(encoder, "layers", None), (nn.ModuleList, nn.Sequential)):
        return [(encoder.layers, str(i)) if isinstance(encoder.layers, nn.ModuleList)
                else (encoder.layers, n) for i, (n, _) in enumerate(encoder.layers.named_children())]
    slots = []
    for holder in (model, getattr(model, "encoder", None)):  # a ResNet, or one as an encoder
        for s in range(1, 5):
            stage = getattr(holder, f"layer{s}", None)
            if isinstance(stage, nn.Sequential):
                slots += [(stage, n) for n, _ in stage.named_children()]
        if slots:
            break
    return slots
