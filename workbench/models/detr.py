"""DETR object detector (Carion et al. 2020, arXiv 2005.12872) as facebookresearch/detr.

ResNet backbone with frozen BatchNorm (`FrozenBatchNorm2d`: statistics and affine terms are
buffers, not parameters), a 1x1 `input_proj` to `hidden`, a fixed sine positional encoding,
a post-norm encoder-decoder transformer with a final decoder LayerNorm, `num_queries` learned
object queries, a class head (`num_classes` + no-object) and a 3-layer box MLP, both applied
to every decoder layer's output (the reference always stacks all decoder layers; the
auxiliary losses use the first `decoder_layers - 1`).

Module names follow the reference (`input_proj`, `query_embed`, `transformer.encoder.layers.{i}
.self_attn`, `transformer.decoder.layers.{i}.multihead_attn`, `linear1`, `norm1`,
`transformer.decoder.norm`, `class_embed`, `bbox_embed.layers.{i}`); the backbone keeps
torchvision's names under `backbone.` (the reference nests them as `backbone.0.body.`).
`nn.MultiheadAttention`'s packed `in_proj_weight`/`in_proj_bias` are held as three Linears
`q_proj`, `k_proj`, `v_proj` (the layout of Hugging Face's `DetrAttention`): the same
parameters, and the same three products the reference computes, since DETR's query/key
(with positions) and value (without) are different tensors.

Parameters: a DETR-R50 module has 41,524,768 (`nn.Module.parameters()`); the reference's
`main.py` prints 41,302,368 because it counts only `requires_grad` parameters and freezes the
backbone's stem and `layer1` (222,400 conv weights). That freezing is a training recipe that
this module does not apply: every parameter here is trained, so the cost model counts the
stem's and layer1's weight gradients (and layer1's input gradients) that the reference skips.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import inputs
from .registry import register_family, register_flavour
from .resnet import ResNet, ResNetConfig


@dataclass(frozen=True)
class DetrConfig:
    """DETR: ResNet backbone, encoder-decoder transformer, set-prediction heads."""

    backbone: ResNetConfig = field(default_factory=ResNetConfig)
    """The ResNet whose `features()` (stem + 4 stages, no pool, no fc) is the backbone; its
    `image_size` and `num_classes` are not used."""
    image_size: tuple[int, int] = (800, 1216)
    """Input (height, width) in pixels: DETR resizes the shorter side to 800 (its test scale
    and largest training scale) and pads batches; 1216 = 38 x 32 is a typical padded long side
    of a 4:3 or 3:2 COCO image (640x427 -> 800x1199)."""
    hidden: int = 256
    """Transformer width (`hidden_dim`)."""
    heads: int = 8
    """Attention heads (`nheads`)."""
    encoder_layers: int = 6
    """Transformer encoder layers (`enc_layers`); 0 feeds the projected features directly."""
    decoder_layers: int = 6
    """Transformer decoder layers (`dec_layers`)."""
    ffn: int = 2048
    """Feed-forward inner width (`dim_feedforward`)."""
    num_queries: int = 100
    """Object queries, the most objects one image can yield."""
    num_classes: int = 91
    """Object classes (COCO's largest category id + 1 = 91); the class head adds no-object."""
    dropout: float = 0.1
    """Dropout of the transformer (residual branches, FFN, attention probabilities)."""

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads

    def validate(self) -> None:
        """Raise ValueError naming the field that breaks a rule."""
        self.backbone.validate()
        if len(self.image_size) != 2 or min(self.image_size) < 32:
            raise ValueError(f"detr: image_size must be (height, width), each >= 32, "
                             f"got {self.image_size}")
        for name in ("hidden", "heads", "decoder_layers", "ffn", "num_queries",
                     "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"detr: {name} must be >= 1, got {getattr(self, name)}")
        if self.encoder_layers < 0:
            raise ValueError(f"detr: encoder_layers must be >= 0, got {self.encoder_layers}")
        if self.hidden % self.heads:
            raise ValueError(f"detr: hidden ({self.hidden}) must be divisible by heads "
                             f"({self.heads})")
        if self.hidden % 4:
            raise ValueError(f"detr: hidden ({self.hidden}) must be divisible by 4 (the sine "
                             "encoding gives hidden/2 features per axis, in sin/cos pairs)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"detr: dropout must be in [0, 1), got {self.dropout}")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine terms, all buffers (DETR's backbone.py)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def frozen_bn_backbone(cfg: ResNetConfig) -> ResNet:
    """A ResNet with every BatchNorm2d replaced by FrozenBatchNorm2d and no avgpool/fc."""
    net = ResNet(cfg)
    del net.avgpool, net.fc  # the reference's IntermediateLayerGetter stops after layer4
    for name, mod in list(net.named_modules()):
        if isinstance(mod, nn.BatchNorm2d):
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child,
                    FrozenBatchNorm2d(mod.num_features))
    return net


def sine_position_encoding(h: int, w: int, hidden: int, like: torch.Tensor,
                           temperature: float = 10000.0) -> torch.Tensor:
    """DETR's `PositionEmbeddingSine(hidden/2, normalize=True)` for an unpadded h x w map.

    Returns (h*w, hidden): hidden/2 y-features then hidden/2 x-features, each interleaving
    sin and cos of the position (normalised to (0, 2pi]) over a geometric frequency ladder.
    """
    feats, eps, scale = hidden // 2, 1e-6, 2 * math.pi
    kw = dict(dtype=torch.float32, device=like.device)
    y = torch.arange(1, h + 1, **kw)
    x = torch.arange(1, w + 1, **kw)
    y, x = y / (y[-1:] + eps) * scale, x / (x[-1:] + eps) * scale
    dim_t = temperature ** (2 * (torch.arange(feats, **kw) // 2) / feats)

    def encode(p: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, feats)
        p = p[:, None] / dim_t
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(h, w, feats)
    pos_x = encode(x)[None, :, :].expand(h, w, feats)
    return torch.cat((pos_y, pos_x), dim=2).reshape(h * w, hidden).to(like.dtype)


class DetrAttention(nn.Module):
    """nn.MultiheadAttention's parameters as q/k/v/out Linears, run through fused SDPA."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        b, lq, d = query.shape
        lk, hd = key.shape[1], d // self.heads
        q = self.q_proj(query).view(b, lq, self.heads, hd).transpose(1, 2)  # (B, nh, Lq, hd)
        k = self.k_proj(key).view(b, lk, self.heads, hd).transpose(1, 2)    # (B, nh, Lk, hd)
        v = self.v_proj(value).view(b, lk, self.heads, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, d))


class EncoderLayer(nn.Module):
    """Post-norm encoder layer; positions are added to the query and key, not the value."""

    def __init__(self, cfg: DetrConfig):
        super().__init__()
        d = cfg.hidden
        self.self_attn = DetrAttention(d, cfg.heads, cfg.dropout)
        self.linear1, self.linear2 = nn.Linear(d, cfg.ffn), nn.Linear(cfg.ffn, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout, self.dropout1, self.dropout2 = (nn.Dropout(cfg.dropout) for _ in range(3))

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        qk = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(qk, qk, src)))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: query self-attention, cross-attention to memory, FFN."""

    def __init__(self, cfg: DetrConfig):
        super().__init__()
        d = cfg.hidden
        self.self_attn = DetrAttention(d, cfg.heads, cfg.dropout)
        self.multihead_attn = DetrAttention(d, cfg.heads, cfg.dropout)
        self.linear1, self.linear2 = nn.Linear(d, cfg.ffn), nn.Linear(cfg.ffn, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout, self.dropout1, self.dropout2, self.dropout3 = (
            nn.Dropout(cfg.dropout) for _ in range(4))

    def forward(self, tgt, memory, pos, query_pos):
        qk = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(qk, qk, tgt)))
        cross = self.multihead_attn(tgt + query_pos, memory + pos, memory)
        tgt = self.norm2(tgt + self.dropout2(cross))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))


class TransformerEncoder(nn.Module):
    """`encoder_layers` post-norm layers, no final norm (DETR removes it for post-norm)."""

    def __init__(self, cfg: DetrConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))

    def forward(self, src, pos):
        for layer in self.layers:
            src = layer(src, pos)
        return src


class TransformerDecoder(nn.Module):
    """`decoder_layers` layers; the shared final LayerNorm normalises every layer's output."""

    def __init__(self, cfg: DetrConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.norm = nn.LayerNorm(cfg.hidden)

    def forward(self, tgt, memory, pos, query_pos) -> torch.Tensor:
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
            outputs.append(tgt)
        # One call on the stack = the reference's per-layer self.norm(output) (a per-token op).
        return self.norm(torch.stack(outputs))  # (L, B, Q, d)


class Transformer(nn.Module):
    """DETR's encoder-decoder (`transformer.encoder`, `transformer.decoder`)."""

    def __init__(self, cfg: DetrConfig):
        super().__init__()
        self.encoder = TransformerEncoder(cfg)
        self.decoder = TransformerDecoder(cfg)


class MLP(nn.Module):
    """DETR's box head: Linear layers with ReLU between (`bbox_embed.layers.{i}`)."""

    def __init__(self, dims: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DETR(nn.Module):
    """Images (B, 3, H, W) -> class logits and normalised (cx, cy, w, h) boxes per query.

    Returns a dict: `pred_logits` (B, Q, num_classes + 1) and `pred_boxes` (B, Q, 4) of the
    last decoder layer, `aux_logits` / `aux_boxes` (decoder_layers - 1, B, Q, .) of the others.
    Batches are unpadded (one image size), so no key-padding mask is needed.
    """

    def __init__(self, cfg: DetrConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.hidden
        self.backbone = frozen_bn_backbone(cfg.backbone)
        self.input_proj = nn.Conv2d(cfg.backbone.out_channels, d, 1)
        self.transformer = Transformer(cfg)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.class_embed = nn.Linear(d, cfg.num_classes + 1)
        self.bbox_embed = MLP([d, d, d, 4])

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        src = self.input_proj(self.backbone.features(images))        # (B, d, h, w)
        b, d, h, w = src.shape
        pos = sine_position_encoding(h, w, d, src).unsqueeze(0)     # (1, h*w, d)
        src = src.flatten(2).transpose(1, 2)                        # (B, h*w, d)
        memory = self.transformer.encoder(src, pos)
        ids = torch.arange(self.cfg.num_queries, device=images.device)
        query_pos = self.query_embed(ids).unsqueeze(0).expand(b, -1, -1)  # (B, Q, d)
        tgt = torch.zeros_like(query_pos)
        hs = self.transformer.decoder(tgt, memory, pos, query_pos)   # (L, B, Q, d)
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        return {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
                "aux_logits": logits[:-1], "aux_boxes": boxes[:-1]}


register_family("detr", DetrConfig, DETR,
                lambda cfg, batch, device: inputs.images(batch, cfg.image_size, device),
                "DETR set-prediction detector (facebookresearch/detr layout)")

register_flavour("detr-r50", "detr", DetrConfig(),
                 "Carion et al. 2020 (arXiv 2005.12872) Sec. 4 and Table 1 (DETR, 41M params); "
                 "facebookresearch/detr main.py defaults and "
                 "models/{detr,transformer,backbone,position_encoding}.py")
register_flavour("detr-tiny", "detr",
                 DetrConfig(backbone=ResNetConfig(stages=(1, 1, 1, 1), width=8),
                            image_size=(64, 96), hidden=32, heads=4, encoder_layers=2,
                            decoder_layers=2, ffn=64, num_queries=10, num_classes=10),
                 "tiny CPU flavour of this project (resnet-tiny backbone)")
