"""The layer graph: the IR every predictor reads (DESIGN.md, "One LayerGraph").

A `LayerGraph` is an ordered list of `Layer`s for one forward + backward pass of a model at a
given batch (and sequence length), plus the few model facts a parallel plan is checked
against (heads, KV heads, sequence, pipeline units). It is made either analytically from a
config (`workbench.costmodel.graph(config)`) or by tracing a module on the meta device
(`workbench.costmodel.tracer.trace`); tests check that the two agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from .ops import OpCost, cost

# How a layer splits under tensor parallelism (Megatron-LM, Shoeybi et al. 2019).
TP_RULES = (
    "none",       # not split by TP (CNN layers, recurrent layers): replicated on every TP rank
    "replicate",  # computed redundantly on every TP rank (norms without sequence parallel)
    "gathered",   # replicated, and opens a replicated block (an MoE layer) that sequence
                  # parallelism all-gathers the input of and re-splits the output of
    "column",     # output features split (QKV, MLP up/gate projections)
    "row",        # input features split, partial sums all-reduced (attention out, MLP down)
    "heads",      # attention heads split
    "vocab",      # vocabulary split (embedding table, output head)
    "sequence",   # split along the sequence with sequence parallelism (norms, dropout, residual)
)

PRE_UNIT = -1
"""`Layer.unit` of layers before the repeated units (stem, embeddings): first pipeline stage."""
POST_UNIT = 10**9
"""`Layer.unit` of layers after the repeated units (final norm, head): last pipeline stage."""


@dataclass(frozen=True)
class Layer:
    """One op of the model, with its cost for the graph's batch."""

    name: str
    """Dotted path of the module (or tensor) it comes from, e.g. `layers.3.attention.wqkv`."""
    kind: str
    """Op kind, a key of `workbench.costmodel.ops.REGISTRY`."""
    shape: dict[str, Any]
    """The keyword arguments the op's formula was called with."""
    fwd_flops: int
    """Forward FLOPs."""
    bwd_flops: int
    """Backward FLOPs."""
    params: int
    """Trainable parameters owned by this op."""
    saved_bytes: int
    """Activation bytes kept for backward."""
    read_bytes: int
    """Bytes read by the forward pass."""
    write_bytes: int
    """Bytes written by the forward pass."""
    counted: bool
    """Whether FlopCounterMode counts this op (matmul, conv, attention, LSTM)."""
    unit: int = PRE_UNIT
    """Repeated unit (transformer block, residual block) it belongs to; pipeline stages take
    whole units. `PRE_UNIT` goes on the first stage, `POST_UNIT` on the last."""
    tp: str = "none"
    """How tensor parallelism splits it, one of `TP_RULES`."""
    cp: bool = False
    """True when context parallelism splits it along the sequence."""
    ep: bool = False
    """True when expert parallelism splits it across experts."""
    tied_to: str | None = None
    """Name of the layer whose weight this one reuses (tied embeddings); its own `params`
    then counts only what it does not borrow (a bias)."""

    @property
    def flops(self) -> int:
        """Forward plus backward FLOPs."""
        return self.fwd_flops + self.bwd_flops


def _tied_weight_elements(kind: str, shape: dict[str, Any]) -> int:
    """Elements of the weight a tied layer borrows (its bias, if any, stays its own)."""
    if kind == "linear":
        return shape["in_features"] * shape["out_features"]
    if kind == "embedding":
        return shape["num_embeddings"] * shape["dim"]
    raise ValueError(f"tied weights are supported for linear and embedding ops, not {kind!r}")


def make_layer(name: str, kind: str, *, unit: int = PRE_UNIT, tp: str = "none", cp: bool = False,
               ep: bool = False, tied_to: str | None = None, **shape) -> Layer:
    """Cost op `kind` for `shape` and wrap it as a `Layer` (the one constructor builders use)."""
    if tp not in TP_RULES:
        raise ValueError(f"layer {name}: tp rule {tp!r} is not one of {TP_RULES}")
    c: OpCost = cost(kind, **shape)
    params = c.params - (_tied_weight_elements(kind, shape) if tied_to else 0)
    return Layer(name=name, kind=kind, shape=dict(shape), fwd_flops=c.fwd_flops,
                 bwd_flops=c.bwd_flops, params=params, saved_bytes=c.saved_bytes,
                 read_bytes=c.read_bytes, write_bytes=c.write_bytes, counted=c.counted,
                 unit=unit, tp=tp, cp=cp, ep=ep, tied_to=tied_to)


@dataclass
class LayerGraph:
    """All layers of one training step's forward and backward pass, in execution order."""

    model: str
    """Model (flavour) name, e.g. `llama3-8b`."""
    family: str
    """Model family, e.g. `llama`, `resnet`."""
    layers: list[Layer]
    """The ops in forward order."""
    batch: int
    """Samples the costs are for."""
    seq: int | None = None
    """Tokens per sample for sequence models (None for images)."""
    units: int = 0
    """Number of repeated units a pipeline splits (transformer blocks, residual blocks)."""
    heads: int | None = None
    """Attention heads (None when the model has no attention)."""
    kv_heads: int | None = None
    """Key/value heads (grouped-query attention)."""
    experts: int | None = None
    """Experts per MoE layer (None for dense models)."""
    dtype_bytes: int = 2
    """Bytes per activation element the byte counts assume."""
    config: dict[str, Any] = field(default_factory=dict)
    """The model config the graph was built from."""
    carried: tuple[tuple[int, int], ...] = ()
    """Per unit boundary (before unit 1, 2, ..., units - 1), the (tensors, bytes) a pipeline
    stage starting there receives besides the previous unit's output: the skip maps made
    before it and read at or after it (U-Net's contracting maps, FCN's pool3 and pool4), which
    the runner's stages pass on as extra tensors. () when nothing crosses (every unit reads
    only its input)."""

    # -- totals -------------------------------------------------------------------------
    @property
    def params(self) -> int:
        """Trainable parameters (tied tensors counted once)."""
        return sum(layer.params for layer in self.layers)

    @property
    def fwd_flops(self) -> int:
        """Forward FLOPs of every op."""
        return sum(layer.fwd_flops for layer in self.layers)

    @property
    def bwd_flops(self) -> int:
        """Backward FLOPs of every op."""
        return sum(layer.bwd_flops for layer in self.layers)

    @property
    def counted_fwd_flops(self) -> int:
        """Forward FLOPs of the ops FlopCounterMode counts (matmul, conv, attention, LSTM)."""
        return sum(layer.fwd_flops for layer in self.layers if layer.counted)

    @property
    def counted_bwd_flops(self) -> int:
        """Backward FLOPs of the ops FlopCounterMode counts."""
        return sum(layer.bwd_flops for layer in self.layers if layer.counted)

    @property
    def model_flops(self) -> int:
        """Model FLOPs of one step (forward + backward, no recomputation): MFU's numerator."""
        return self.fwd_flops + self.bwd_flops

    def recompute_flops(self, recompute: str) -> int:
        """Forward FLOPs activation recomputation reruns: `full` every unit's forward,
        `selective` the units' attention kernels, `none` nothing (pre/post layers never)."""
        if recompute not in ("none", "selective", "full"):
            raise ValueError(f"recompute={recompute!r} is not one of none, selective, full")
        return sum(l.fwd_flops for l in self.layers if 0 <= l.unit < self.units and (
            recompute == "full" or (recompute == "selective" and l.kind == "attention")))

    @property
    def saved_bytes(self) -> int:
        """Activation bytes saved for backward, whole model, no recomputation."""
        return sum(layer.saved_bytes for layer in self.layers)

    @property
    def tokens(self) -> int:
        """Tokens per step (batch x seq), or samples for non-sequence models."""
        return self.batch * (self.seq or 1)

    def unit_layers(self) -> dict[int, list[Layer]]:
        """Layers grouped by `Layer.unit` (PRE_UNIT first, POST_UNIT last)."""
        groups: dict[int, list[Layer]] = {}
        for layer in self.layers:
            groups.setdefault(layer.unit, []).append(layer)
        return dict(sorted(groups.items()))

    # -- views --------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per layer (for tables and JSON)."""
        return [
            {"name": l.name, "kind": l.kind, "unit": l.unit, "params": l.params,
             "fwd_flops": l.fwd_flops, "bwd_flops": l.bwd_flops, "saved_bytes": l.saved_bytes,
             "read_bytes": l.read_bytes, "write_bytes": l.write_bytes, "counted": l.counted,
             "tp": l.tp, "cp": l.cp, "ep": l.ep,
             "shape": {k: list(v) if isinstance(v, tuple) else v for k, v in l.shape.items()}}
            for l in self.layers
        ]

    def summary(self) -> dict[str, Any]:
        """Totals and model facts as a plain dict."""
        return {"model": self.model, "family": self.family, "batch": self.batch, "seq": self.seq,
                "units": self.units, "heads": self.heads, "kv_heads": self.kv_heads,
                "experts": self.experts, "layers": len(self.layers), "params": self.params,
                "fwd_flops": self.fwd_flops, "bwd_flops": self.bwd_flops,
                "counted_fwd_flops": self.counted_fwd_flops,
                "counted_bwd_flops": self.counted_bwd_flops, "saved_bytes": self.saved_bytes}

    def to_json(self) -> dict[str, Any]:
        """Summary, config and layer rows, JSON-serialisable."""
        return {**self.summary(), "config": self.config, "layer_table": self.rows()}


def carried_across(units: int, skips: list[tuple[int, int, int]]) -> tuple[tuple[int, int], ...]:
    """`LayerGraph.carried` of skip tensors given as (bytes, unit that makes it, first unit
    that reads it; `POST_UNIT` for the layers after the units): a skip crosses every
    boundary before unit u with maker < u <= reader."""
    out = []
    for u in range(1, units):
        crossing = [size for size, made, read in skips if made < u <= read]
        out.append((len(crossing), sum(crossing)))
    return tuple(out)


class GraphBuilder:
    """Helper the analytic builders use: appends layers under a name prefix and unit."""

    def __init__(self, dtype_bytes: int = 2):
        self.layers: list[Layer] = []
        self.dtype_bytes = dtype_bytes

    def add(self, name: str, kind: str, *, unit: int = PRE_UNIT, tp: str = "none",
            cp: bool = False, ep: bool = False, tied_to: str | None = None, **shape) -> Layer:
        """Append one op, costed at the builder's `dtype_bytes` unless `shape` says otherwise."""
        shape.setdefault("dtype_bytes", self.dtype_bytes)
        layer = make_layer(name, kind, unit=unit, tp=tp, cp=cp, ep=ep, tied_to=tied_to, **shape)
        self.layers.append(layer)
        return layer

    def extend(self, layers: Iterable[Layer]) -> None:
        """Append already-made layers."""
        self.layers.extend(layers)
