"""A layer graph compressed for fast, vectorised evaluation of many plans.

Layers with identical costs and sharding rules (the same op in every transformer block) share
one *signature*; the graph becomes a signature table plus a count matrix
`counts[row, signature]` whose rows are [pre, unit 0, ..., unit U-1, post]. Everything the
cost model computes per layer is computed per signature (S x plans) and summed to units,
stages and steps with matrix products. Costs are per sample (the graph is built at batch 1)
and scale with the microbatch size.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from ..stages import virtual_stage_units
from .graph import POST_UNIT, PRE_UNIT, LayerGraph

TP_SPLIT = ("column", "row", "heads", "vocab")
"""TP rules whose work and parameters are divided by the TP degree."""

VOCAB_LOSS_ALLREDUCES = 3
"""TP all-reduces of a cross-entropy over vocabulary-split logits, each of one value per token,
all in the forward pass: the row maximum, the sum of exponentials and the target's logit
(Megatron-LM's `_VocabParallelCrossEntropy`; torch's `loss_parallel`, which the runner uses:
measured on gloo, GPT-tiny at TP 2 issued 2 of shape (tokens, 1) and 1 of (tokens,) a
microbatch beyond the 18 of its layers, each about 1.1 ms of a 90 ms step)."""


@dataclass
class GraphProfile:
    """Signature table and count matrix of one graph (per sample)."""

    graph: LayerGraph
    """The graph it was made from (batch 1)."""
    kind: np.ndarray
    """Op kind per signature (object array of str)."""
    tp_split: np.ndarray
    """True where TP divides the op (column, row, heads, vocab)."""
    tp_sequence: np.ndarray
    """True where sequence parallelism divides the op over the TP group."""
    cp: np.ndarray
    """True where CP divides the op along the sequence."""
    ep: np.ndarray
    """True for expert ops (their parameters divide by EP)."""
    counted: np.ndarray
    """True for matmul / conv / attention / LSTM ops."""
    fwd_flops: np.ndarray
    """Forward FLOPs per sample."""
    bwd_flops: np.ndarray
    """Backward FLOPs per sample."""
    rw_bytes: np.ndarray
    """Forward bytes read + written per sample."""
    saved_bytes: np.ndarray
    """Activation bytes saved for backward per sample."""
    params: np.ndarray
    """Parameters."""
    tp_allreduce_bytes: np.ndarray
    """Bytes per sample of the TP all-reduce the op needs per pass (0 if none): the output of
    row-parallel and vocab-parallel-embedding ops, the input grad of the vocab-parallel head."""
    tp_fwd_calls: np.ndarray
    """TP all-reduces of the op in the forward pass (row-parallel and vocab embedding: 1)."""
    tp_bwd_calls: np.ndarray
    """TP all-reduces of the op in the backward pass (row-parallel and vocab head: 1)."""
    score_elements: np.ndarray
    """Attention score elements per sample (heads x q_len x kv_len), 0 for other ops."""
    kv_bytes: np.ndarray
    """Attention K+V bytes per sample (what ring attention passes around), 0 otherwise."""
    qo_bytes: np.ndarray
    """Attention Q+O bytes per sample (with `kv_bytes`, what all-to-all CP moves)."""
    moe_buffer_bytes: np.ndarray
    """Expert input buffer bytes per sample (what all-to-all dispatch moves), on `w1` only."""
    tp_gather_bytes: np.ndarray
    """Input bytes per sample of a block TP leaves whole (an MoE layer; the `gathered` op
    that opens it), which sequence parallelism all-gathers; 0 for other ops."""
    tp_loss_bytes: np.ndarray
    """Bytes per sample of each of the `VOCAB_LOSS_ALLREDUCES` forward all-reduces of a loss
    over vocabulary-split logits (one element per token, in the plan's dtype; the runner's
    loss runs in fp32, 4 bytes, whatever the plan); 0 for other ops."""
    counts: np.ndarray
    """(U+2) x S: layers of each signature in each row [pre, units..., post]."""
    checkpoint_sig: np.ndarray
    """Per row, the signature of its first layer (whose saved input is the checkpoint kept
    by full recomputation); -1 for empty rows."""

    @cached_property
    def unit_counts(self) -> np.ndarray:
        """`counts` with the pre and post rows zeroed (what recomputation reruns)."""
        u = self.counts.copy()
        u[[0, -1]] = 0
        return u

    @cached_property
    def checkpoint_counts(self) -> np.ndarray:
        """(U+2) x S: each unit row holds only its first layer (the checkpoint full
        recomputation keeps); pre and post rows keep every layer."""
        k = np.zeros_like(self.counts)
        rows = np.arange(1, self.counts.shape[0] - 1)
        sig = self.checkpoint_sig[rows]
        k[rows[sig >= 0], sig[sig >= 0]] = 1
        k[[0, -1]] = self.counts[[0, -1]]
        return k

    @property
    def units(self) -> int:
        """Pipeline units."""
        return self.counts.shape[0] - 2

    def stage_matrix(self, pp: int, vpp: int) -> np.ndarray:
        """pp x (U+2) 0/1 matrix: which rows each physical stage runs."""
        return _stage_matrix(self.units, pp, vpp)


@lru_cache(maxsize=256)
def _stage_matrix(units: int, pp: int, vpp: int) -> np.ndarray:
    m = np.zeros((pp, units + 2))
    for stage, unit_ids in enumerate(_stages(units, pp, vpp)):
        m[stage, np.asarray(unit_ids, dtype=int) + 1] = 1
    m[0, 0] = 1
    m[pp - 1, units + 1] = 1
    return m


def _stages(units: int, pp: int, vpp: int) -> list[list[int]]:
    chunks = virtual_stage_units(units, pp, vpp)
    return [sum((chunks[c] for c in range(s, pp * vpp, pp)), []) for s in range(pp)]


def _row(unit: int, units: int) -> int:
    if unit == PRE_UNIT:
        return 0
    if unit == POST_UNIT:
        return units + 1
    return unit + 1


def profile(graph: LayerGraph) -> GraphProfile:
    """Compress a batch-1 graph into signatures and counts."""
    if graph.batch != 1:
        raise ValueError(f"profile needs a graph built at batch 1, got batch {graph.batch}")
    keys: dict[tuple, int] = {}
    cols: list[dict] = []
    rows = graph.units + 2
    entries = []
    first_sig = np.full(rows, -1)
    vocab_rows = {layer.unit: layer.shape["tokens"] for layer in graph.layers
                  if layer.tp == "vocab" and layer.kind == "linear"}
    for layer in graph.layers:
        tp_bytes, tp_fwd, tp_bwd = 0, 0, 0
        loss = (graph.dtype_bytes * vocab_rows[layer.unit]  # one element per token
                if layer.tp == "vocab" and layer.kind == "elementwise" and layer.unit in vocab_rows
                else 0)
        if layer.tp == "row":
            tp_bytes, tp_fwd, tp_bwd = layer.write_bytes, 1, 1
        elif layer.tp == "vocab" and layer.kind == "embedding":
            tp_bytes, tp_fwd = layer.write_bytes, 1
        elif layer.tp == "vocab" and layer.kind == "linear":
            tp_bytes, tp_bwd = layer.saved_bytes, 1
        shape = layer.shape
        score = kv = qo = moe = 0
        if layer.kind == "attention":
            score = shape["heads"] * shape["q_len"] * shape["kv_len"] * shape.get("batch", 1)
            kv = (2 * shape.get("batch", 1) * (shape.get("kv_heads") or shape["heads"])
                  * shape["kv_len"] * shape["head_dim"] * shape.get("dtype_bytes", 2))
            qo = (2 * shape.get("batch", 1) * shape["heads"] * shape["q_len"] * shape["head_dim"]
                  * shape.get("dtype_bytes", 2))
        if layer.kind == "batched_matmul" and layer.ep and layer.name.endswith(".w1"):
            moe = shape["batch"] * shape["m"] * shape["k"] * shape.get("dtype_bytes", 2)
        gather = (shape["tokens"] * shape["in_features"] * shape.get("dtype_bytes", 2)
                  if layer.tp == "gathered" else 0)
        col = dict(kind=layer.kind, tp_split=layer.tp in TP_SPLIT,
                   tp_sequence=layer.tp == "sequence", cp=layer.cp, ep=layer.ep,
                   counted=layer.counted, fwd_flops=layer.fwd_flops, bwd_flops=layer.bwd_flops,
                   rw_bytes=layer.read_bytes + layer.write_bytes, saved_bytes=layer.saved_bytes,
                   params=layer.params, tp_allreduce_bytes=tp_bytes, tp_fwd_calls=tp_fwd,
                   tp_bwd_calls=tp_bwd,
                   score_elements=score, kv_bytes=kv, qo_bytes=qo, moe_buffer_bytes=moe,
                   tp_gather_bytes=gather, tp_loss_bytes=loss)
        key = tuple(col.values())
        if key not in keys:
            keys[key] = len(cols)
            cols.append(col)
        row = _row(layer.unit, graph.units)
        entries.append((row, keys[key]))
        if first_sig[row] < 0:
            first_sig[row] = keys[key]
    counts = np.zeros((rows, len(cols)))
    for row, sig in entries:
        counts[row, sig] += 1
    arrays = {name: np.array([c[name] for c in cols],
                             dtype=object if name == "kind" else None) for name in cols[0]}
    for name in ("fwd_flops", "bwd_flops", "rw_bytes", "saved_bytes", "params",
                 "tp_allreduce_bytes", "score_elements", "kv_bytes", "qo_bytes",
                 "moe_buffer_bytes", "tp_gather_bytes", "tp_loss_bytes"):
        arrays[name] = arrays[name].astype(float)
    return GraphProfile(graph=graph, counts=counts, checkpoint_sig=first_sig, **arrays)
