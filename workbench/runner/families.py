"""What the runner needs to know per model family: data, loss and TP plan (the pipeline
split of each family is in `pipeline_parts.py`).

- `batch(cfg, n, seed)`: seeded synthetic inputs and targets of the right shapes.
- `loss(output, target)`: cross-entropy for classifiers and language models (next-token
  targets), mean squared error towards zero for dense outputs (detectors, segmenters), whose
  target is an empty (n, 0) tensor so that batches and pipeline schedules split it like any.
- `tp_plan(model, sp)`: module path -> parallel style (torchtitan's style).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import models


def batch(cfg, n: int, seed: int = 0) -> tuple[tuple, torch.Tensor]:
    """(inputs, target) for `n` samples: the family's example inputs and a seeded target."""
    inputs = models.example_inputs(cfg, n, "cpu")
    gen = torch.Generator().manual_seed(seed + 1)
    fam = models.family_of(cfg).name
    if fam in ("llama", "gpt", "lstm"):
        target = torch.randint(0, cfg.vocab, inputs[0].shape, generator=gen)
    elif fam == "captioner":
        target = torch.randint(0, cfg.vocab, inputs[1].shape, generator=gen)
    elif hasattr(cfg, "num_classes") and fam not in ("detr", "unet", "fcn", "yolo"):
        target = torch.randint(0, cfg.num_classes, (n,), generator=gen)
    else:
        target = torch.zeros(n, 0)  # dense outputs regress onto zero: an empty target per sample
    return inputs, target


def loss(output, target) -> torch.Tensor:
    """Mean loss over the batch (so DP/PP averaging matches one process on the whole batch)."""
    if isinstance(output, dict):
        return sum(loss(v, None) for v in output.values())
    if isinstance(output, (tuple, list)):
        return sum(loss(v, None) for v in output)
    if target is None or target.numel() == 0:
        return output.float().pow(2).mean()
    if output.dim() == target.dim() + 1:  # logits (..., classes)
        return F.cross_entropy(output.flatten(0, -2).float(), target.flatten())
    return F.mse_loss(output.float(), target.float())


def _block_plan(prefix: str, block, seq, sp: bool) -> dict:
    """TP (+ SP) of one `models.layers.Block`: head-grouped QKV and fc1 column-parallel, the
    output projections row-parallel (an MoE MLP stays whole on every TP rank)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   RowwiseParallel, SequenceParallel)

    from ..models.layers import MLP
    plan = {f"{prefix}.attn": PrepareModuleInput(input_layouts=(seq,),
                                                 desired_input_layouts=(Replicate(),)),
            f"{prefix}.attn.qkv": ColwiseParallel(),
            f"{prefix}.attn.proj": RowwiseParallel(output_layouts=seq)}
    if isinstance(block.mlp, MLP):
        plan.update({f"{prefix}.mlp": PrepareModuleInput(input_layouts=(seq,),
                                                         desired_input_layouts=(Replicate(),)),
                     f"{prefix}.mlp.fc1": ColwiseParallel(),
                     f"{prefix}.mlp.fc2": RowwiseParallel(output_layouts=seq)})
    else:
        plan[f"{prefix}.mlp"] = _replicated_moe(seq)
    if sp:
        plan[f"{prefix}.ln_1"] = SequenceParallel()
        plan[f"{prefix}.ln_2"] = SequenceParallel()
    return plan


def retie(model: nn.Module) -> None:
    """Share GPT's (tied) head weight with the embedding again after TP replaced both: both
    are split the same way (vocabulary rows), so one DTensor serves both."""
    from ..models.gpt import GPT
    if isinstance(model, GPT) and model.cfg.tied:
        model.lm_head.weight = model.wte.weight


def tp_plan(model: nn.Module, sp: bool) -> dict:
    """Megatron-style TP (+ sequence parallel) plan (torchtitan's layout): Llama with
    vocabulary-parallel embedding and head; GPT and ViT blocks with replicated embeddings and
    heads (GPT's are tied); sequence parallelism for Llama and GPT."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   RowwiseParallel, SequenceParallel)

    from ..models.gpt import GPT
    from ..models.llama import Llama
    from ..models.moe import MoE
    from ..models.vit import VisionTransformer
    seq = Shard(1) if sp else Replicate()
    if isinstance(model, GPT):
        # Vocabulary-parallel word embedding and head (Megatron-LM), as the cost model
        # assumes; `retie` restores the shared weight after the split.
        plan = {"wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
                "lm_head": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1),
                                           use_local_output=False)}
        for i, block in enumerate(model.h):
            plan.update(_block_plan(f"h.{i}", block, seq, sp))
        if sp:  # the residual stream is sequence-sharded between the embeddings and ln_f
            plan["h.0"] = PrepareModuleInput(input_layouts=(Replicate(),),
                                             desired_input_layouts=(Shard(1),),
                                             use_local_output=True)
            plan["ln_f"] = SequenceParallel()
        return plan
    if isinstance(model, VisionTransformer):
        if sp:
            raise ValueError("sequence parallel is implemented in the runner for llama and gpt")
        plan = {}
        for i, block in enumerate(model.encoder.layers):
            plan.update(_block_plan(f"encoder.layers.{i}", block, seq, sp))
        return plan
    if not isinstance(model, Llama):
        raise ValueError(f"tensor parallelism is implemented in the runner for llama, gpt, vit "
                         f"and vit-moe (got {type(model).__name__})")
    plan = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
            # vocabulary-parallel logits, consumed by a vocabulary-parallel cross-entropy
            # (`loss_parallel`): the logits are never gathered (Megatron-LM, torchtitan).
            "output": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1),
                                      use_local_output=False)}
    if sp:
        plan["norm"] = SequenceParallel()
    for i, block in enumerate(model.layers):
        p = f"layers.{i}"
        plan.update({
            f"{p}.attention": PrepareModuleInput(input_layouts=(seq, None, None),
                                                 desired_input_layouts=(Replicate(), None, None)),
            f"{p}.attention.wq": ColwiseParallel(), f"{p}.attention.wk": ColwiseParallel(),
            f"{p}.attention.wv": ColwiseParallel(),
            f"{p}.attention.wo": RowwiseParallel(output_layouts=seq)})
        if isinstance(block.feed_forward, MoE):
            plan[f"{p}.feed_forward"] = _replicated_moe(seq)
        else:
            plan.update({
                f"{p}.feed_forward": PrepareModuleInput(input_layouts=(seq,),
                                                        desired_input_layouts=(Replicate(),)),
                f"{p}.feed_forward.w1": ColwiseParallel(),
                f"{p}.feed_forward.w3": ColwiseParallel(),
                f"{p}.feed_forward.w2": RowwiseParallel(output_layouts=seq)})
        if sp:
            plan[f"{p}.attention_norm"] = SequenceParallel()
            plan[f"{p}.ffn_norm"] = SequenceParallel()
    return plan


def _replicated_moe(seq):
    """MoE layers stay whole on every TP rank (experts split by EP instead)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import PrepareModuleInputOutput
    return PrepareModuleInputOutput(input_layouts=(seq,), desired_input_layouts=(Replicate(),),
                                    use_local_input=True, output_layouts=(Replicate(),),
                                    desired_output_layouts=(seq,), use_local_output=True)
