"""Analytic graph of `workbench.models.captioner.Captioner`.

Pipeline units are the encoder's residual blocks. The language side (image embedding, word
embeddings, the `nn.LSTM`, the vocabulary projection and the loss) is one module chain of a
few percent of the FLOPs that a pipeline cannot split inside `nn.LSTM`, so it goes on the
last stage (`POST_UNIT`). The word-embedding lookup goes there too: it is needed only by
the LSTM.
"""
from __future__ import annotations

from dataclasses import asdict

from ...models.captioner import CaptionerConfig
from ...models.resnet import block_plan
from ..graph import POST_UNIT, GraphBuilder, LayerGraph
from . import graph_builder
from .common import FeatureMap
from .resnet import add_resnet_features


@graph_builder(CaptionerConfig)
def captioner_graph(cfg: CaptionerConfig, batch: int, dtype_bytes: int) -> LayerGraph:
    """Encoder blocks as units; pool, embeddings, LSTM layers, logits and loss on the last."""
    b = GraphBuilder(dtype_bytes)
    size = cfg.encoder.image_size
    image = FeatureMap(batch, 3, (size, size), requires_grad=False)
    fm = add_resnet_features(b, cfg.encoder, image, prefix="encoder.")
    fm = fm.adaptive_pool(b, "encoder.avgpool", 1, unit=POST_UNIT)
    post = dict(unit=POST_UNIT)
    t, steps = cfg.caption_len, cfg.caption_len + 1  # caption tokens; LSTM steps (image first)
    b.add("image_embedding", "linear", tokens=batch, in_features=fm.channels,
          out_features=cfg.embed_dim, bias=False, **post)
    b.add("seq_embedding", "embedding", tokens=batch * t, num_embeddings=cfg.vocab,
          dim=cfg.embed_dim, tp="vocab", **post)
    b.add("input_dropout", "elementwise", elements=batch * steps * cfg.embed_dim, **post)
    for i in range(cfg.lstm_layers):
        b.add(f"lstm.layer{i}", "lstm", batch=batch, seq=steps,
              input_size=cfg.embed_dim if i == 0 else cfg.hidden, hidden=cfg.hidden, **post)
        if i < cfg.lstm_layers - 1:
            b.add(f"lstm.dropout{i}", "elementwise", elements=batch * steps * cfg.hidden, **post)
    b.add("output_dropout", "elementwise", elements=batch * t * cfg.hidden, **post)
    b.add("logits", "linear", tokens=batch * t, in_features=cfg.hidden, out_features=cfg.vocab,
          unit=POST_UNIT, tp="vocab")
    b.add("loss", "elementwise", elements=batch * t * cfg.vocab, flops_per_element=4,
          unit=POST_UNIT, tp="vocab")
    return LayerGraph(model="", family="captioner", layers=b.layers, batch=batch,
                      units=len(block_plan(cfg.encoder)), dtype_bytes=dtype_bytes,
                      config=asdict(cfg))
