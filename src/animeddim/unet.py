"""The Keras-example residual U-Net: (noisy images, noise variance, cond) -> predicted noise.

The network never sees the schedule: it gets the noise variance (noise_rate**2) of each
image and returns eps_hat (a network trained to predict v converts its output with that
variance alone, `model.prediction`). Every denoiser in animeddim has the signature
``(x_t, noise_variance, cond=None)``: `cond` is the conditioning the samplers pass through
unchanged. A network whose config has a vocabulary is conditional: `cond` is an [N x A]
LongTensor of attribute codes (:data:`NULL` = -1 for a dropped or unasked attribute), or None
for all null. Each attribute has an embedding with a learned null entry; their sum enters
through zero-initialised projections (after each residual block's first conv, as
improved-diffusion adds its embedding, and/or added to the noise embedding at the input), so
a conditional network holding an unconditional network's weights computes exactly its
output until the projections are trained. Layer for layer it follows the
Keras DDIM example (sinusoidal embedding, residual blocks with non-affine BatchNorm and
swish, average-pool down, bilinear up, zero-initialised 1x1 output), with Keras'
initialisers and BatchNorm constants so that a port behaves like the original.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig
from .diffusion.objectives import eps_from_v

NULL = -1  # the code of a dropped or unasked attribute (labels.NULL)


def sinusoidal_embedding(
    noise_variances: torch.Tensor, dims: int, max_frequency: float
) -> torch.Tensor:
    """Embed noise variances with sines and cosines of frequencies 1 .. max_frequency.

    :param noise_variances: [N] or [N x 1 x 1 x 1] values in [0, 1].
    :return: [N x dims x 1 x 1] embedding (sin half, then cos half).
    """
    x = noise_variances.reshape(-1, 1).float()
    frequencies = torch.exp(
        torch.linspace(math.log(1.0), math.log(max_frequency), dims // 2, device=x.device)
    )
    angular_speeds = 2.0 * math.pi * frequencies
    emb = torch.cat([torch.sin(angular_speeds * x), torch.cos(angular_speeds * x)], dim=1)
    return emb[:, :, None, None]


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1


def _conv(c_in: int, c_out: int, k: int) -> nn.Conv2d:
    # Keras Conv2D defaults: glorot-uniform kernel, zero bias, "same" padding.
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2)
    nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _zero_linear(c_in: int, c_out: int) -> nn.Linear:
    # Zero weight and bias: a new conditioning path starts as an exact no-op.
    linear = nn.Linear(c_in, c_out)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class ResidualBlock(nn.Module):
    """BN(no affine) -> conv3x3 (+ projected condition) + swish -> conv3x3, plus a
    (1x1-projected) residual."""

    def __init__(self, c_in: int, width: int, cond_dims: int = 0):
        super().__init__()
        self.skip = _conv(c_in, width, 1) if c_in != width else nn.Identity()
        # Keras BatchNormalization(center=False, scale=False): momentum 0.99, epsilon 1e-3.
        self.norm = nn.BatchNorm2d(c_in, eps=1e-3, momentum=0.01, affine=False)
        self.conv1 = _conv(c_in, width, 3)
        self.conv2 = _conv(width, width, 3)
        self.cond_proj = _zero_linear(cond_dims, width) if cond_dims else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """:param c: [N x cond_dims] attribute embedding, or None (unconditional network)."""
        residual = self.skip(x)
        x = self.conv1(self.norm(x))
        if self.cond_proj is not None and c is not None:
            x = x + self.cond_proj(c).to(x.dtype)[:, :, None, None]
        return self.conv2(F.silu(x)) + residual


class AttributeEmbedding(nn.Module):
    """Sum over attributes of a learned embedding per value, the last entry being null.

    forward(codes [N x A] int64 with NULL = -1, or None for all null) -> [N x dims].
    """

    def __init__(self, vocabulary: dict[str, list[str]], dims: int):
        super().__init__()
        sizes = [len(v) for v in vocabulary.values()]
        self.tables = nn.ModuleList(nn.Embedding(k + 1, dims) for k in sizes)
        self.register_buffer("null_codes", torch.tensor(sizes, dtype=torch.long), persistent=False)

    def forward(self, codes: torch.Tensor | None, n: int) -> torch.Tensor:
        if codes is None:
            idx = self.null_codes.expand(n, -1)
        else:
            codes = codes.to(self.null_codes.device, torch.long)
            idx = torch.where(codes < 0, self.null_codes, codes)
        return sum(table(idx[:, a]) for a, table in enumerate(self.tables))


def is_cond_parameter(name: str) -> bool:
    """Whether a state-dict key belongs to the conditioning path (absent from an
    unconditional network's weights; `train --init` starts it fresh)."""
    return name.startswith("cond_") or ".cond_proj." in name


class UNet(nn.Module):
    """Residual U-Net predicting eps (or v = alpha eps - sigma x0, `cfg.prediction`) from x_t.

    forward(noisy_images [N x C x S x S], noise_variances [N], cond=None) -> eps_hat
    [N x C x S x S] (a v-network's output converted, `diffusion.objectives.eps_from_v`);
    `cond`: [N x A] attribute codes of a conditional network (None: all null); an
    unconditional network ignores it.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        widths, depth = cfg.widths, cfg.block_depth
        conditional = bool(cfg.vocabulary)
        d = cfg.cond_dims if conditional and cfg.cond_at in ("blocks", "both") else 0
        self.cond_embed = AttributeEmbedding(cfg.vocabulary, cfg.cond_dims) if conditional else None
        self.cond_input = (
            _zero_linear(cfg.cond_dims, cfg.embedding_dims)
            if conditional and cfg.cond_at in ("input", "both")
            else None
        )
        self.stem = _conv(cfg.channels, widths[0], 1)
        c = widths[0] + cfg.embedding_dims
        self.down = nn.ModuleList()
        skip_channels = []
        for w in widths[:-1]:
            blocks = nn.ModuleList()
            for _ in range(depth):
                blocks.append(ResidualBlock(c, w, d))
                c = w
                skip_channels.append(c)
            self.down.append(blocks)
        self.mid = nn.ModuleList()
        for _ in range(depth):
            self.mid.append(ResidualBlock(c, widths[-1], d))
            c = widths[-1]
        self.up = nn.ModuleList()
        for w in reversed(widths[:-1]):
            blocks = nn.ModuleList()
            for _ in range(depth):
                blocks.append(ResidualBlock(c + skip_channels.pop(), w, d))
                c = w
            self.up.append(blocks)
        self.head = _conv(c, cfg.channels, 1)
        # Zero-initialised output: the untrained network predicts eps_hat = 0.
        nn.init.zeros_(self.head.weight)

    def forward(
        self,
        noisy_images: torch.Tensor,
        noise_variances: torch.Tensor,
        cond: Any = None,
        *,
        raw: bool = False,
    ) -> torch.Tensor:
        """eps_hat, whatever the network predicts (`cfg.prediction`); `raw`: its own output
        (eps_hat or v_hat), what training compares with its target."""
        out = self._predict(noisy_images, noise_variances, cond)
        if raw or self.cfg.prediction == "eps":
            return out
        return eps_from_v(noisy_images, out, noise_variances)

    def _predict(
        self, noisy_images: torch.Tensor, noise_variances: torch.Tensor, cond: Any
    ) -> torch.Tensor:
        size = noisy_images.shape[-1]
        e = sinusoidal_embedding(
            noise_variances, self.cfg.embedding_dims, self.cfg.embedding_max_frequency
        )
        c = None
        if self.cond_embed is not None:
            c = self.cond_embed(cond, noisy_images.shape[0])
            if self.cond_input is not None:  # the Keras way: added to the noise embedding
                e = e + self.cond_input(c)[:, :, None, None]
        e = e.to(noisy_images.dtype).expand(-1, -1, size, size)  # nearest upsampling of 1x1
        h = self.stem(noisy_images)
        if _channels_last(h):
            # cat follows its inputs' layout only when they agree, and the expanded embedding
            # has none: laid out here, the first block runs channels_last forward and backward
            # as the rest of the net does (its BatchNorm backward got a channels_last gradient
            # for an NCHW input, a slow mixed-layout path).
            e = e.contiguous(memory_format=torch.channels_last)
        x = torch.cat([h, e], dim=1)
        skips = []
        for blocks in self.down:
            for block in blocks:
                x = block(x, c)
                skips.append(x)
            x = F.avg_pool2d(x, 2)
        for block in self.mid:
            x = block(x, c)
        for blocks in self.up:
            x = _laid_out_grad(upsample2x(x))
            for block in blocks:
                x = block(torch.cat([x, skips.pop()], dim=1), c)
        return self.head(x)


# Compiled CPU training upsamples by a stencil of slices and adds (`_twice`), not by
# F.interpolate: inductor turns bilinear upsampling's backward into a scatter-add
# (index_put) kernel that took 333 of the 1,199 ms of a compiled bf16 training step (batch
# 64, 64 px), and the stencil's backward is plain slices and adds: 65 -> 95 images/s on a
# Zen 5 (docs/benchmarks.md). Eager code and inference (no backward: the stencil measured
# 2-3% slower there) keep PyTorch's own kernel.
STENCIL_WHEN_COMPILED_ON_CPU = True


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Bilinear upsampling by 2 with half-pixel centres (`F.interpolate(x, scale_factor=2,
    mode="bilinear", align_corners=False)`, Keras' UpSampling2D(interpolation="bilinear")),
    equal to it up to rounding (1-2 ulp). Keeps x's memory format."""
    if not (
        STENCIL_WHEN_COMPILED_ON_CPU
        and x.device.type == "cpu"
        and torch.is_grad_enabled()
        and torch.compiler.is_compiling()
    ):
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    if _channels_last(x):
        y = x.permute(0, 2, 3, 1)  # N H W C, contiguous
        return _twice(_twice(y, 2), 1).permute(0, 3, 1, 2)
    return _twice(_twice(x, 3), 2)


def _twice(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x upsampled 2x along `dim`: output 2i is 0.25 x[i-1] + 0.75 x[i], output 2i+1 is
    0.75 x[i] + 0.25 x[i+1], with the edge values repeated (x[-1] = x[0], x[n] = x[n-1]):
    the half-pixel bilinear weights, which PyTorch clamps at the edges the same way."""
    n = x.shape[dim]
    prev = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)
    nxt = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)
    out = torch.stack([0.25 * prev + 0.75 * x, 0.75 * x + 0.25 * nxt], dim + 1)
    shape = list(x.shape)
    shape[dim] = 2 * n
    return out.reshape(shape)


class _LaidOutGrad(torch.autograd.Function):
    """Identity whose backward lays the gradient out channels_last.

    cat's backward hands each input a slice of a channels_last gradient, laid out in
    neither format; bilinear upsampling's backward took 115 ms on such a slice against
    17 ms on a channels_last copy (64 images, 64 channels, 32 -> 64 px).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


def _laid_out_grad(x: torch.Tensor) -> torch.Tensor:
    """x itself; in a channels_last training pass its gradient arrives channels_last."""
    if torch.is_grad_enabled() and x.requires_grad and _channels_last(x):
        return _LaidOutGrad.apply(x)
    return x


class NormFoldedConv(nn.Module):
    """conv(BN(x)) for a non-affine BatchNorm in eval mode, with BN folded into the conv.

    BN(x) = scale * x + shift per input channel (running statistics). The conv's zero
    padding applies to BN(x), so folding is exact only with a bias *map*, not a bias:
    conv(W, scale x + shift) = conv(W * scale, x) + conv(W, shift image) + b, where the
    second term is constant over the batch but smaller at the borders (padded taps).
    That [1 x C_out x H x W] map is computed once per input size and dtype.
    """

    def __init__(self, norm: nn.BatchNorm2d, conv: nn.Conv2d):
        super().__init__()
        scale = (norm.running_var + norm.eps).rsqrt()
        self.padding = conv.padding
        self.weight = nn.Parameter(conv.weight * scale.view(1, -1, 1, 1), requires_grad=False)
        self.register_buffer("shift", -norm.running_mean * scale)
        self.register_buffer("conv_weight", conv.weight.detach().clone())
        self.register_buffer("conv_bias", conv.bias.detach().clone())
        self._maps: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def bias_map(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape[-2:], x.dtype, x.device)
        if key not in self._maps:
            shift = self.shift.double().view(1, -1, 1, 1).expand(1, -1, *x.shape[-2:])
            m = F.conv2d(shift, self.conv_weight.double(), self.conv_bias.double(), 1, self.padding)
            self._maps[key] = m.to(x.dtype).contiguous(memory_format=_format_of(x))
        return self._maps[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, None, 1, self.padding) + self.bias_map(x)


def _format_of(x: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if x.is_contiguous(memory_format=torch.channels_last)
        else (torch.contiguous_format)
    )


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` for inference with every block's BatchNorm folded into its conv1
    (any module: its `ResidualBlock`s are folded, the rest is copied as it is).

    Exact up to rounding (see NormFoldedConv); the copy is in eval mode, without gradients.
    """
    folded = copy.deepcopy(model).eval().requires_grad_(False)
    for m in folded.modules():
        if isinstance(m, ResidualBlock) and isinstance(m.norm, nn.BatchNorm2d):
            m.conv1 = NormFoldedConv(m.norm, m.conv1)
            m.norm = nn.Identity()
    return folded


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
