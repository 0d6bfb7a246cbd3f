"""A PyTorch re-statement of guided-diffusion's UNetModel encoder half (time_embed,
input_blocks, middle_block), written from the published architecture in NCHW with the
official state-dict names. It is the independent side of the ADM port's test: a different
framework, layout and attention code path, the same random weights."""

import math

import torch
from torch import nn


def norm(channels):
    return nn.GroupNorm(32, channels)


class ResBlock(nn.Module):
    def __init__(self, channels, out_channels, emb_channels, scale_shift, down=False):
        super().__init__()
        self.down, self.scale_shift = down, scale_shift
        self.in_layers = nn.Sequential(norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if scale_shift else out_channels))
        self.out_layers = nn.Sequential(norm(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        if self.down:
            h = self.in_layers[:-1](x)
            h, x = nn.functional.avg_pool2d(h, 2), nn.functional.avg_pool2d(x, 2)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, channels, heads):
        super().__init__()
        self.heads = heads
        self.norm = norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        ch = c // self.heads
        q, k, v = qkv.reshape(b * self.heads, 3 * ch, -1).split(ch, dim=1)
        s = 1 / math.sqrt(math.sqrt(ch))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s).float(), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
        return (x + self.proj_out(a)).reshape(b, c, *spatial)


class Seq(nn.ModuleList):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADMEncoderTorch(nn.Module):
    def __init__(self, image_size, in_channels, model_channels, channel_mult, num_res_blocks,
                 attention_resolutions, num_head_channels, scale_shift=True):
        super().__init__()
        self.model_channels = model_channels
        emb = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        ch = model_channels * channel_mult[0]
        blocks = [Seq([nn.Conv2d(in_channels, ch, 3, padding=1)])]
        ds = 1
        attend = {image_size // r for r in attention_resolutions}
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, mult * model_channels, emb, scale_shift)]
                ch = mult * model_channels
                if ds in attend:
                    layers.append(AttentionBlock(ch, ch // num_head_channels))
                blocks.append(Seq(layers))
            if level != len(channel_mult) - 1:
                blocks.append(Seq([ResBlock(ch, ch, emb, scale_shift, down=True)]))
                ds *= 2
        self.input_blocks = nn.ModuleList(blocks)
        self.middle_block = Seq([ResBlock(ch, ch, emb, scale_shift), AttentionBlock(ch, ch // num_head_channels),
                                 ResBlock(ch, ch, emb, scale_shift)])

    def forward(self, x, t):
        half = self.model_channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = self.time_embed(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        h = self.input_blocks[0](x, emb)
        for block in self.input_blocks[1:]:
            h = block(h, emb)
        return self.middle_block(h, emb)
