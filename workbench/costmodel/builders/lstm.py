"""Analytic graph of `workbench.models.lstm.LSTMLanguageModel`.

Each LSTM layer is a pipeline unit (`layers.{i}.layer0`, the name the tracer gives the one
layer of the model's i-th `nn.LSTM`); the embedding goes on the first stage, dropout, output projection and loss on
the last. Tensor parallelism does not split recurrent models (`tp="none"` throughout).
"""
from __future__ import annotations

from ...models.lstm import LSTMConfig
from ..graph import POST_UNIT, PRE_UNIT, GraphBuilder, LayerGraph
from . import graph_builder


@graph_builder(LSTMConfig)
def lstm_graph(cfg: LSTMConfig, batch: int, dtype_bytes: int) -> LayerGraph:
    """Embedding, dropout, `layers` LSTM layers (dropout between them), dropout, output
    linear over the vocabulary (tied to the embedding when `cfg.tied`), loss."""
    b = GraphBuilder(dtype_bytes)
    s, t = cfg.seq, batch * cfg.seq
    b.add("encoder", "embedding", tokens=t, num_embeddings=cfg.vocab, dim=cfg.embed,
          unit=PRE_UNIT)
    if cfg.dropout:
        b.add("drop_in", "elementwise", elements=t * cfg.embed, unit=PRE_UNIT)
    for i in range(cfg.layers):
        b.add(f"layers.{i}.layer0", "lstm", batch=batch, seq=s,
              input_size=cfg.embed if i == 0 else cfg.hidden, hidden=cfg.hidden, unit=i)
        if cfg.dropout and i < cfg.layers - 1:  # dropout on each output but the last
            b.add(f"layers.{i}.dropout", "elementwise", elements=t * cfg.hidden, unit=i)
    if cfg.dropout:
        b.add("drop_out", "elementwise", elements=t * cfg.hidden, unit=POST_UNIT)
    b.add("decoder", "linear", tokens=t, in_features=cfg.hidden, out_features=cfg.vocab,
          unit=POST_UNIT, tied_to="encoder" if cfg.tied else None)
    b.add("loss", "elementwise", elements=t * cfg.vocab, flops_per_element=4, unit=POST_UNIT)
    return LayerGraph(model="", family="lstm", layers=b.layers, batch=batch, seq=s,
                      units=cfg.layers, dtype_bytes=dtype_bytes, config=cfg.__dict__.copy())
