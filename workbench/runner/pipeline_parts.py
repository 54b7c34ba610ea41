"""Pipeline splits per family: (pre, units, post) modules whose composition is the model.

Pipeline stages take whole units, the first stage also `pre` and the last `post`, exactly as
the layer graph's units, so predictions and runs split the same way. Units whose skip
connections reach later units (U-Net, FCN) or that need several inputs (DETR's decoder)
pass tuples: the activation first, then what later units need.
"""
from __future__ import annotations

import torch
from torch import nn


class _Embed(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.tok_embeddings = model.tok_embeddings

    def forward(self, tokens):
        return self.tok_embeddings(tokens)


class _LlamaUnit(nn.Module):
    def __init__(self, block, model):
        super().__init__()
        self.block = block
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, h):
        return self.block(h, self.rope_cos, self.rope_sin)


class _Head(nn.Module):
    def __init__(self, norm, output):
        super().__init__()
        self.norm, self.output = norm, output

    def forward(self, h):
        return self.output(self.norm(h))


class _GPTEmbed(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.wte, self.wpe, self.model = model.wte, model.wpe, [model]

    def forward(self, tokens):
        offset = self.model[0].position_offset
        pos = torch.arange(tokens.shape[1], device=tokens.device) + offset
        return self.wte(tokens) + self.wpe(pos)


class _ResNetStem(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = m.conv1, m.bn1, m.relu, m.maxpool

    def forward(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class _ResNetHead(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.avgpool, self.fc = m.avgpool, m.fc

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(x), 1))


class _ViTEmbed(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.conv_proj, self.class_token = m.conv_proj, m.class_token
        self.pos_embedding = m.encoder.pos_embedding

    def forward(self, images):
        x = self.conv_proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embedding


class _ViTHead(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.ln, self.heads = m.encoder.ln, m.heads

    def forward(self, x):
        x = self.ln(x)[:, 0]
        for layer in self.heads.values():
            x = layer(x)
        return x


class _Call(nn.Module):
    """A unit made of modules applied in order, with a flatten before the first Linear."""

    def __init__(self, *mods, flatten_first: bool = False):
        super().__init__()
        self.mods = nn.ModuleList(mods)
        self.flatten_first = flatten_first

    def forward(self, x):
        for m in self.mods:
            if self.flatten_first and isinstance(m, nn.Linear) and x.dim() > 2:
                x = torch.flatten(x, 1)
            x = m(x)
        return x


class StageSequential(nn.Module):
    """A pipeline stage's parts in order. A part may return a tuple (the activation plus the
    skip tensors later parts need); the next part receives it unpacked, as the next stage
    does when the pipeline sends a tuple."""

    def __init__(self, *parts):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, *state):
        for part in self.parts:
            state = part(*state) if isinstance(state, tuple) else part(state)
        return state


class _UNetConv(nn.Module):
    """One 3x3 convolution + ReLU of a U-Net level, carrying the skip maps as extra tensors:
    the first convolution of an expansive level takes the up-convolution and the
    crop-and-concat of the last skip first; the second of a contracting level keeps its
    output as a skip and applies the level's pool."""

    def __init__(self, conv, relu, *, up=None, pool=None, keep_skip=False):
        super().__init__()
        self.conv, self.relu, self.up, self.pool, self.keep_skip = conv, relu, up, pool, keep_skip

    def forward(self, x, *skips):
        from ..models.unet import center_crop
        if self.up is not None:
            x = self.up(x)
            skip, skips = skips[-1], skips[:-1]
            x = torch.cat([center_crop(skip, x.shape[2], x.shape[3]), x], dim=1)
        x = self.relu(self.conv(x))
        if self.keep_skip:
            skips = (*skips, x)
        if self.pool is not None:
            x = self.pool(x)
        return (x, *skips) if skips else x


def _unet_parts(model) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """A unit per 3x3 convolution, as the graph: pools join the convolution before them,
    up-convolutions and crop-and-concat the one after."""
    units = []
    for i, enc in enumerate(model.encoder):
        bottom = i == len(model.encoder) - 1
        units.append(_UNetConv(enc.conv1, enc.relu1))
        units.append(_UNetConv(enc.conv2, enc.relu2, keep_skip=not bottom,
                               pool=None if bottom else model.pools[i]))
    for up, dec in zip(model.upconvs, model.decoder):
        units.append(_UNetConv(dec.conv1, dec.relu1, up=up))
        units.append(_UNetConv(dec.conv2, dec.relu2))
    return nn.Identity(), units, model.head


class _Carry(nn.Module):
    """Apply modules to the activation, carry the skip tensors along; `keep` appends the
    result to them (FCN keeps pool3 and pool4 for its head)."""

    def __init__(self, *mods, keep: bool = False):
        super().__init__()
        self.mods, self.keep = nn.ModuleList(mods), keep

    def forward(self, x, *skips):
        for m in self.mods:
            x = m(x)
        if self.keep:
            skips = (*skips, x)
        return (x, *skips) if skips else x


class _FCNHead(nn.Module):
    """FCN-8s's three-stream head on (fc7 output, pool3, pool4)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, h, pool3, pool4):
        from ..models.fcn import CROP_OUT, CROP_POOL3, CROP_POOL4
        m = self.m
        up2 = m.upscore2(m.score_fr(h))
        s4 = m.score_pool4(pool4)
        s4 = s4[:, :, CROP_POOL4:CROP_POOL4 + up2.shape[2], CROP_POOL4:CROP_POOL4 + up2.shape[3]]
        up4 = m.upscore_pool4(up2 + s4)
        s3 = m.score_pool3(pool3)
        s3 = s3[:, :, CROP_POOL3:CROP_POOL3 + up4.shape[2], CROP_POOL3:CROP_POOL3 + up4.shape[3]]
        out = m.upscore8(up4 + s3)
        size = m.cfg.image_size
        return out[:, :, CROP_OUT:CROP_OUT + size, CROP_OUT:CROP_OUT + size].contiguous()


def _fcn_parts(model) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """A unit per backbone convolution (+ its stage's pool), then fc6 and fc7, as the graph;
    the head after them reads the carried pool3 and pool4 maps."""
    units = []
    for stage, n in enumerate(model.cfg.convs, start=1):
        for j in range(1, n + 1):
            last = j == n
            mods = [getattr(model, f"conv{stage}_{j}"), getattr(model, f"relu{stage}_{j}")]
            units.append(_Carry(*mods, *([getattr(model, f"pool{stage}")] if last else []),
                                keep=last and stage in (3, 4)))
    units.append(_Carry(model.fc6, model.relu6, model.drop6))
    units.append(_Carry(model.fc7, model.relu7, model.drop7))
    return nn.Identity(), units, _FCNHead(model)


class _DetrEncoderUnit(nn.Module):
    """An encoder layer on (src); the first also projects the backbone map to tokens. The
    sine positions are recomputed from the map size (constants, never sent)."""

    def __init__(self, model, layer, hw, project: bool):
        super().__init__()
        self.layer, self.hw, self.d = layer, hw, model.cfg.hidden
        self.input_proj = model.input_proj if project else None

    def forward(self, src):
        from ..models.detr import sine_position_encoding
        if self.input_proj is not None:
            src = self.input_proj(src).flatten(2).transpose(1, 2)   # (B, h*w, d)
        pos = sine_position_encoding(*self.hw, self.d, src).unsqueeze(0)
        return self.layer(src, pos)


class _DetrDecoderUnit(nn.Module):
    """A decoder layer on (tgt, memory, query_pos, outputs so far...); the first makes the
    queries from the encoder's memory."""

    def __init__(self, model, layer, hw, first: bool):
        super().__init__()
        self.layer, self.hw, self.d, self.first = layer, hw, model.cfg.hidden, first
        self.query_embed = model.query_embed if first else None
        self.num_queries = model.cfg.num_queries

    def forward(self, *state):
        from ..models.detr import sine_position_encoding
        if self.first:
            memory = state[0]
            ids = torch.arange(self.num_queries, device=memory.device)
            query_pos = self.query_embed(ids).unsqueeze(0).expand(memory.shape[0], -1, -1)
            tgt, outputs = torch.zeros_like(query_pos), ()
        else:
            tgt, memory, query_pos, *outputs = state
        pos = sine_position_encoding(*self.hw, self.d, memory).unsqueeze(0)
        tgt = self.layer(tgt, memory, pos, query_pos)
        return (tgt, memory, query_pos, *outputs, tgt)


class _DetrHead(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.norm, self.class_embed, self.bbox_embed = (model.transformer.decoder.norm,
                                                        model.class_embed, model.bbox_embed)

    def forward(self, tgt, memory, query_pos, *outputs):
        hs = self.norm(torch.stack(outputs))
        logits, boxes = self.class_embed(hs), self.bbox_embed(hs).sigmoid()
        # DETR's dict as a tuple in the same order (pipeline stages pass tensors only)
        return logits[-1], boxes[-1], logits[:-1], boxes[:-1]


def _detr_parts(model) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """Backbone blocks, encoder layers, decoder layers as units (the graph's), heads after."""
    from .. import costmodel
    proj = next(l for l in costmodel.graph(model.cfg).layers if l.name == "input_proj")
    hw = proj.shape["out_spatial"]
    bb = model.backbone
    blocks = [b for s in range(len(bb.cfg.stages)) for b in getattr(bb, f"layer{s + 1}")]
    enc = [_DetrEncoderUnit(model, l, hw, i == 0)
           for i, l in enumerate(model.transformer.encoder.layers)]
    dec = [_DetrDecoderUnit(model, l, hw, i == 0)
           for i, l in enumerate(model.transformer.decoder.layers)]
    return _ResNetStem(bb), blocks + enc + dec, _DetrHead(model)


class _TemporalConv(nn.Module):
    """I3D's first convolution with its replicate padding in time."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        from ..models.i3d import temporal_conv
        return temporal_conv(self.conv, x)


class _Reshape(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return x.view(*self.shape)


def _plain_cnn_parts(model) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """VGG / AlexNet (`features`, `avgpool`, `classifier`): a unit starts at each convolution
    or hidden Linear (a dropout right before a Linear joins it), ReLUs and pools join the unit
    before them, the average pool and flatten go with the first classifier unit and the last
    Linear is the head: the units of the graph builders."""
    units, current = [], []
    for m in model.features:
        if isinstance(m, nn.Conv2d) and current:
            units.append(_Call(*current))
            current = []
        current.append(m)
    units.append(_Call(*current))
    layers, current = list(model.classifier), [model.avgpool]
    for i, m in enumerate(layers[:-1]):
        starts = isinstance(m, nn.Linear) or (isinstance(m, nn.Dropout)
                                               and isinstance(layers[i + 1], nn.Linear))
        if starts and any(isinstance(c, nn.Linear) for c in current):
            units.append(_Call(*current, flatten_first=True))
            current = []
        current.append(m)
    units.append(_Call(*current, flatten_first=True))
    return nn.Identity(), units, layers[-1]


def pipeline_parts(model: nn.Module) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """(pre, units, post) of a model; raises for families without a pipeline split yet."""
    from ..models.alexnet import AlexNet
    from ..models.c3d import C3D
    from ..models.detr import DETR
    from ..models.fcn import FCN8s
    from ..models.unet import UNet
    from ..models.yolo import YOLOv1
    from ..models.gpt import GPT
    from ..models.i3d import I3D
    from ..models.llama import Llama
    from ..models.r2plus1d import R2Plus1D
    from ..models.resnet import ResNet
    from ..models.vgg import VGG
    from ..models.vit import VisionTransformer
    if isinstance(model, VisionTransformer):
        return _ViTEmbed(model), list(model.encoder.layers), _ViTHead(model)
    if isinstance(model, (VGG, AlexNet)):
        return _plain_cnn_parts(model)
    if isinstance(model, UNet):
        return _unet_parts(model)
    if isinstance(model, FCN8s):
        return _fcn_parts(model)
    if isinstance(model, DETR):
        if not model.transformer.encoder.layers:
            raise ValueError("pipeline parallel DETR needs at least one encoder layer")
        return _detr_parts(model)
    if isinstance(model, YOLOv1):  # a unit per conv block, then fc1 (+ act, dropout)
        s, c = model.cfg.grid, model.cfg.cell_outputs
        return (nn.Identity(), [*model.features, _Call(model.fc1, model.fc1_act, model.dropout,
                                                       flatten_first=True)],
                _Call(model.fc2, _Reshape((-1, s, s, c))))
    if isinstance(model, C3D):  # a unit per convolution (+ ReLU, + its stage's pool)
        units = []
        for names, pool in model.stages:
            for i, name in enumerate(names):
                last = i == len(names) - 1
                units.append(_Call(getattr(model, name), model.relu,
                                   *([getattr(model, pool)] if last else [])))
        hidden, out, head = (getattr(model, n) for n in model.fc_names)
        return nn.Identity(), units, _Call(hidden, model.relu, model.dropout, out, model.relu,
                                           model.dropout, head, flatten_first=True)
    if isinstance(model, R2Plus1D):
        blocks = [b for s in range(len(model.cfg.stages)) for b in getattr(model, f"layer{s + 1}")]
        return model.stem, blocks, _Call(model.avgpool, model.fc, flatten_first=True)
    if isinstance(model, I3D):  # pool2 closes layer1, as in the graph
        stages = [list(getattr(model, f"layer{s + 1}")) for s in range(len(model.cfg.base.stages))]
        stages[0][-1] = _Call(stages[0][-1], model.pool2)
        stem = _Call(_TemporalConv(model.conv1), model.bn1, model.relu, model.maxpool)
        return (stem, [b for s in stages for b in s],
                _Call(model.avgpool, model.dropout, model.fc, flatten_first=True))
    if isinstance(model, Llama):
        return (_Embed(model), [_LlamaUnit(b, model) for b in model.layers],
                _Head(model.norm, model.output))
    if isinstance(model, GPT):
        if model.lm_head.weight is model.wte.weight:
            raise ValueError("pipeline parallel GPT needs untied embeddings (--set tied=false): "
                             "the runner does not synchronise tied weights across stages")
        return _GPTEmbed(model), list(model.h), _Head(model.ln_f, model.lm_head)
    if isinstance(model, ResNet):
        blocks = [b for s in range(len(model.cfg.stages)) for b in getattr(model, f"layer{s + 1}")]
        return _ResNetStem(model), blocks, _ResNetHead(model)
    raise ValueError(f"pipeline parallelism is not implemented in the runner for "
                     f"{type(model).__name__} (llama, gpt, vit, vit-moe and resnet have it)")
