"""LoRA-IR's IR network re-stated in PyTorch from ../shared/LORA_IR.md (sections 1, 2 and 5),
for the tests: NAFNet with DAM heads on the encoder stages and the middle, and every
convolution wrapped with routed low-rank experts in loralib's layout, under the authors'
state-dict names (`encoders.0.blocks.0.conv1.conv.weight`, `...conv1.lora_A_list`). Not the
authors' code: a statement of the same computation to hold dod-jax's port against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ExpertConv(nn.Module):
    """conv(x, W, b) + sum_e w_e conv(x, dW_e, no bias), dW_e = (B_e @ A_e).view(W) * alpha / r;
    in eval mode at batch 1, as the authors' code, one conv with W + sum_e w_e dW_e."""

    def __init__(self, cin, cout, k, *, stride=1, padding=0, groups=1, bias=True, experts=3, rank=2):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, groups=groups, bias=bias)
        self.lora_A_list = nn.Parameter(torch.zeros(experts, rank * k, cin * k))
        self.lora_B_list = nn.Parameter(torch.zeros(experts, cout // groups * k, rank * k))
        self.scale = 2.0  # alpha = 2r
        self.routing = None  # (B, experts), set by the model for each call

    def delta(self, e):
        return (self.lora_B_list[e] @ self.lora_A_list[e]).view(self.conv.weight.shape) * self.scale

    def forward(self, x):
        if not self.training and x.shape[0] == 1:  # the authors' eval at batch 1: one conv with merged weights
            weight = self.conv.weight + sum(self.routing[0, e] * self.delta(e) for e in range(self.lora_A_list.shape[0]))
            return F.conv2d(x, weight, self.conv.bias, self.conv.stride, self.conv.padding, 1, self.conv.groups)
        out = self.conv(x)
        for e in range(self.lora_A_list.shape[0]):
            update = F.conv2d(x, self.delta(e), None, self.conv.stride, self.conv.padding, 1, self.conv.groups)
            out = out + self.routing[:, e].view(-1, 1, 1, 1) * update
        return out


class LayerNorm2d(nn.Module):
    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        return self.weight.view(1, -1, 1, 1) * (x - mu) / (var + self.eps).sqrt() + self.bias.view(1, -1, 1, 1)


def tlc_average(x, window):
    """NAFNet-TLC's AvgPool2d (its summed-area form), with edge replication back to x's size."""
    n, c, h, w = x.shape
    if window is None or (window[0] >= h and window[1] >= w):
        return F.adaptive_avg_pool2d(x, 1)
    k1, k2 = min(h, window[0]), min(w, window[1])
    s = F.pad(x.cumsum(dim=-1).cumsum(dim=-2), (1, 0, 1, 0))
    s1, s2, s3, s4 = s[:, :, :-k1, :-k2], s[:, :, :-k1, k2:], s[:, :, k1:, :-k2], s[:, :, k1:, k2:]
    out = (s4 + s1 - s2 - s3) / (k1 * k2)
    _h, _w = out.shape[2:]
    return F.pad(out, ((w - _w) // 2, (w - _w + 1) // 2, (h - _h) // 2, (h - _h + 1) // 2), mode="replicate")


class Pool(nn.Module):
    def __init__(self, window):
        super().__init__()
        self.window = window

    def forward(self, x):
        return tlc_average(x, self.window)


class NAFBlock(nn.Module):
    def __init__(self, c, window, **ex):
        super().__init__()
        dw = 2 * c
        self.conv1 = ExpertConv(c, dw, 1, **ex)
        self.conv2 = ExpertConv(dw, dw, 3, padding=1, groups=dw, **ex)
        self.conv3 = ExpertConv(dw // 2, c, 1, **ex)
        self.sca = nn.Sequential(Pool(window), ExpertConv(dw // 2, dw // 2, 1, **ex))
        self.conv4 = ExpertConv(c, 2 * c, 1, **ex)
        self.conv5 = ExpertConv(c, c, 1, **ex)
        self.norm1, self.norm2 = LayerNorm2d(c), LayerNorm2d(c)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, inp):
        x = self.conv2(self.conv1(self.norm1(inp)))
        x1, x2 = x.chunk(2, dim=1)
        x = x1 * x2
        x = self.conv3(x * self.sca(x))
        y = inp + x * self.beta
        x1, x2 = self.conv4(self.norm2(y)).chunk(2, dim=1)
        return y + self.conv5(x1 * x2) * self.gamma


class StageWithDAM(nn.Module):
    def __init__(self, c, n, embed, hidden, window, **ex):
        super().__init__()
        self.conv1 = ExpertConv(embed, hidden, 1, **ex)
        self.conv2 = ExpertConv(hidden, c, 1, **ex)
        self.conv3 = ExpertConv(c, c // 16, 1, **ex)
        self.conv4 = ExpertConv(c // 16, c, 1, **ex)
        self.norm = LayerNorm2d(c)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.blocks = nn.Sequential(*[NAFBlock(c, window, **ex) for _ in range(n)])

    def forward(self, x, e_d):
        m = torch.sigmoid(self.conv4(F.relu(self.conv3(self.conv2(F.gelu(self.conv1(e_d)))))))
        return self.blocks(x + self.beta * (self.norm(x) * m))


class Decoder(nn.Module):
    def __init__(self, c, n, window, **ex):
        super().__init__()
        self.blocks = nn.Sequential(*[NAFBlock(c, window, **ex) for _ in range(n)])

    def forward(self, x):
        return self.blocks(x)


class LoRAIRNet(nn.Module):
    """The IR network of LoRA-IR's fine-tuned model; `forward(lq, e_clip, routing)`, NCHW."""

    def __init__(self, width=64, enc=(1, 1, 1, 28), middle=1, dec=(1, 1, 1, 1), embed=384, hidden=128,
                 experts=3, rank=2, tlc=None):
        super().__init__()
        ex = dict(experts=experts, rank=rank)

        def window(scale):
            if tlc is None:
                return None
            train_size, base_size = tlc
            side = train_size // scale * base_size // train_size
            return (side, side)

        self.intro = ExpertConv(3, width, 3, padding=1, **ex)
        self.intro_de = nn.Sequential(ExpertConv(embed, embed, 1, **ex), nn.GELU(),
                                      ExpertConv(embed, embed, 1, **ex), nn.GELU())
        self.encoders, self.downs, c = nn.ModuleList(), nn.ModuleList(), width
        for i, n in enumerate(enc):
            self.encoders.append(StageWithDAM(c, n, embed, hidden, window(2 ** i), **ex))
            self.downs.append(ExpertConv(c, 2 * c, 2, stride=2, **ex))
            c *= 2
        self.middle_blks = StageWithDAM(c, middle, embed, hidden, window(2 ** len(enc)), **ex)
        self.ups, self.decoders = nn.ModuleList(), nn.ModuleList()
        for i, n in enumerate(dec):
            self.ups.append(nn.Sequential(ExpertConv(c, 2 * c, 1, bias=False, **ex), nn.PixelShuffle(2)))
            c //= 2
            self.decoders.append(Decoder(c, n, window(2 ** (len(dec) - 1 - i)), **ex))
        self.ending = ExpertConv(width, 3, 3, padding=1, **ex)

    def forward(self, lq, e_clip, routing):
        for m in self.modules():
            if isinstance(m, ExpertConv):
                m.routing = routing
        h, w = lq.shape[2:]
        padded = F.pad(lq, (0, -w % 16, 0, -h % 16))
        e_d = self.intro_de(e_clip[:, :, None, None])
        x, skips = self.intro(padded), []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x, e_d)
            skips.append(x)
            x = down(x)
        x = self.middle_blks(x, e_d)
        for decoder, up, skip in zip(self.decoders, self.ups, skips[::-1]):
            x = decoder(up(x) + skip)
        return (self.ending(x) + padded)[:, :, :h, :w]


def randomise(model: nn.Module, seed: int = 0):
    """Every parameter drawn at random, non-trivially (no zero B, no unit norms, no zero beta)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            scale = 0.5 if name.endswith(("beta", "gamma")) else 1.0 / fan_in ** 0.5
            offset = 1.0 if p.ndim == 1 and name.endswith("weight") else 0.0  # LayerNorm scales near 1
            p.copy_(torch.randn(p.shape, generator=generator) * scale + offset)
    return model
