"""GFPGANv1Clean, the network behind the public GFPGAN v1.3 / v1.4 weights, in plain PyTorch.

Wang et al., "Towards Real-World Blind Face Restoration with Generative Facial Prior", CVPR 2021. A small
U-Net reads the degraded 512×512 face; its bottleneck becomes 16 W+ latents for a StyleGAN2 generator and
its decoder levels become spatial feature transforms (scale and shift) applied to that generator's
features, so the generator's face prior fills in detail while the U-Net keeps the identity and pose.

Written from TencentARC/GFPGAN's ``gfpganv1_clean_arch.py`` and ``stylegan2_clean_arch.py`` (the "clean"
generator: no custom CUDA ops), because the official package needs basicsr and facexlib, which need
torchvision. Module and parameter names, shapes and buffers are exactly those of the official
``params_ema`` state dict, so converted weights load with ``strict=True``. Two deliberate differences
(the first equal to the reference up to rounding and its 1e-8 eps; tests/test_restore.py checks it):

- :class:`ModulatedConv2d` scales the activations instead of building one weight per sample (StyleGAN2-ADA's
  ``fused_modconv=False``): one ordinary convolution for the whole batch instead of a grouped one, with
  the demodulation coefficients computed in fp32 and the styles normalised first, so fp16 cannot overflow.
- The generator's noise defaults to the stored ``noises`` buffers (``randomize_noise=False``), so a face
  restores the same way every time and whatever it is batched with; the official inference draws fresh
  noise on each call.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

SQRT2 = math.sqrt(2.0)  # StyleConv's gain after the modulated convolution ("for conversion")


def channels(narrow: float = 1.0, channel_multiplier: int = 2) -> dict[int, int]:
    """StyleGAN2's feature channels per resolution (the U-Net uses ``narrow / 2``)."""
    wide = {4: 512, 8: 512, 16: 512, 32: 512}
    mult = {64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
    return {
        **{res: int(c * narrow) for res, c in wide.items()},
        **{res: int(c * channel_multiplier * narrow) for res, c in mult.items()},
    }


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------------
# StyleGAN2 "clean" generator parts


class NormStyleCode(nn.Module):
    """Pixel norm of the style codes over dim 1 (the style MLP's first layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated convolution, without bias: ``conv(x, W · s[in] · d[out])``.

    ``s`` is an affine map of the style; with ``demodulate`` each output channel is divided by the norm of
    its modulated weights, ``d = rsqrt(Σ (W · s)² + eps)``. Computed as ``conv(x · s, W) · d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        num_style_feat: int,
        demodulate: bool = True,
        upsample: bool = False,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.demodulate, self.upsample, self.eps = demodulate, upsample, eps
        self.padding = kernel_size // 2
        self.modulation = nn.Linear(num_style_feat, in_channels)
        nn.init.ones_(self.modulation.bias)  # styles start at 1, as in the reference's init
        self.weight = nn.Parameter(
            torch.randn(1, out_channels, in_channels, kernel_size, kernel_size)
            / math.sqrt(in_channels * kernel_size**2)
        )

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        s = self.modulation(style).float()  # (b, in)
        weight = self.weight[0]  # (out, in, k, k)
        if self.demodulate:
            # d is invariant to a per-sample scale of s: normalise s so x · s stays in fp16 range.
            s = s / s.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)
            d = torch.rsqrt(s.pow(2) @ weight.float().pow(2).sum((2, 3)).T + self.eps)  # (b, out)
        if self.upsample:  # bilinear ×2 is linear per channel, so it commutes with the scaling by s
            x = _up(x)
        out = F.conv2d(x * s[:, :, None, None].to(x.dtype), weight, padding=self.padding)
        if self.demodulate:
            out = out * d[:, :, None, None].to(out.dtype)
        return out


class StyleConv(nn.Module):
    """Modulated 3×3 conv (× √2), plus weighted noise and bias, then LeakyReLU(0.2)."""

    def __init__(self, in_channels: int, out_channels: int, num_style_feat: int, upsample: bool) -> None:
        super().__init__()
        self.modulated_conv = ModulatedConv2d(
            in_channels, out_channels, 3, num_style_feat, demodulate=True, upsample=upsample
        )
        self.weight = nn.Parameter(torch.zeros(1))  # noise strength
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        out = self.modulated_conv(x, style) * SQRT2
        if noise is None:
            noise = out.new_empty(out.shape[0], 1, *out.shape[2:]).normal_()
        return F.leaky_relu(out + self.weight * noise + self.bias, 0.2)


class ToRGB(nn.Module):
    """Modulated 1×1 conv to RGB (no demodulation) plus bias, added to the upsampled running image."""

    def __init__(self, in_channels: int, num_style_feat: int, upsample: bool = True) -> None:
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = ModulatedConv2d(in_channels, 3, 1, num_style_feat, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        if skip is not None:
            out = out + (_up(skip) if self.upsample else skip)
        return out


class ConstantInput(nn.Module):
    """The generator's learned 4×4 starting features."""

    def __init__(self, num_channel: int, size: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, num_channel, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.expand(batch, -1, -1, -1)


class StyleGAN2GeneratorCSFT(nn.Module):
    """StyleGAN2 generator whose features after each upsampling conv get the U-Net's SFT scale and shift.

    Latents: ``2·log2(out_size) − 2`` style vectors; level k (8 px, 16 px, …) uses latents 2k+1 and 2k+2
    for its two convs and 2k+3 for its ToRGB. With ``sft_half`` only the second half of the channels is
    transformed.
    """

    def __init__(
        self,
        out_size: int,
        num_style_feat: int = 512,
        num_mlp: int = 8,
        channel_multiplier: int = 2,
        narrow: float = 1.0,
        sft_half: bool = False,
    ) -> None:
        super().__init__()
        self.sft_half = sft_half
        self.log_size = int(math.log2(out_size))
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.num_latent = self.log_size * 2 - 2
        mlp: list[nn.Module] = [NormStyleCode()]
        for _ in range(num_mlp):
            mlp += [nn.Linear(num_style_feat, num_style_feat), nn.LeakyReLU(0.2)]
        self.style_mlp = nn.Sequential(*mlp)  # z → w; unused when GFPGAN feeds W+ latents directly
        ch = channels(narrow, channel_multiplier)
        self.constant_input = ConstantInput(ch[4])
        self.style_conv1 = StyleConv(ch[4], ch[4], num_style_feat, upsample=False)
        self.to_rgb1 = ToRGB(ch[4], num_style_feat, upsample=False)
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for i in range(self.num_layers):  # 4, 8, 8, 16, 16, … px
            res = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise{i}", torch.randn(1, 1, res, res))
        in_ch = ch[4]
        for level in range(3, self.log_size + 1):
            out_ch = ch[2**level]
            self.style_convs.append(StyleConv(in_ch, out_ch, num_style_feat, upsample=True))
            self.style_convs.append(StyleConv(out_ch, out_ch, num_style_feat, upsample=False))
            self.to_rgbs.append(ToRGB(out_ch, num_style_feat))
            in_ch = out_ch

    def _sft(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        if not self.sft_half:
            return x * scale + shift
        same, sft = x.split(x.shape[1] // 2, dim=1)
        return torch.cat([same, sft * scale + shift], dim=1)

    def forward(
        self, latent: torch.Tensor, conditions: list[tuple[torch.Tensor, torch.Tensor]], randomize_noise: bool
    ) -> torch.Tensor:
        """``latent`` (b, num_latent, num_style_feat); ``conditions`` one (scale, shift) per level."""
        noise: list[torch.Tensor | None] = (
            [None] * self.num_layers
            if randomize_noise
            else [getattr(self.noises, f"noise{i}") for i in range(self.num_layers)]
        )
        out = self.style_conv1(self.constant_input(latent.shape[0]), latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        for k, to_rgb in enumerate(self.to_rgbs):
            i = 2 * k + 1
            out = self.style_convs[i - 1](out, latent[:, i], noise[i])
            if k < len(conditions):
                out = self._sft(out, *conditions[k])
            out = self.style_convs[i](out, latent[:, i + 1], noise[i + 1])
            skip = to_rgb(out, latent[:, i + 2], skip)
        return skip


# --------------------------------------------------------------------------------------------------
# GFPGAN: U-Net encoder/decoder that drives the generator


class ResBlock(nn.Module):
    """Two 3×3 convs with bilinear ×0.5 (``down``) or ×2 (``up``) between them; 1×1 resampled skip."""

    def __init__(self, in_channels: int, out_channels: int, mode: str) -> None:
        super().__init__()
        self.scale_factor = {"down": 0.5, "up": 2.0}[mode]
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.conv1(x), 0.2)
        out = F.leaky_relu(self.conv2(self._resample(out)), 0.2)
        return out + self.skip(self._resample(x))


def _sft_branch(ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(ch, out_ch, 3, 1, 1))


class GFPGANv1Clean(nn.Module):
    """GFPGAN (clean): U-Net + StyleGAN2 decoder with SFT. Defaults are those of the v1.3 / v1.4 weights.

    ``forward(x)`` takes RGB faces in [-1, 1], (b, 3, out_size, out_size), and returns ``(image, rgbs)``:
    the restored faces in about [-1, 1] and, with ``return_rgb``, the U-Net's intermediate RGB outputs
    (a training aid; empty by default).
    """

    def __init__(
        self,
        out_size: int = 512,
        num_style_feat: int = 512,
        channel_multiplier: int = 2,
        decoder_load_path: str | None = None,
        fix_decoder: bool = False,
        num_mlp: int = 8,
        input_is_latent: bool = True,
        different_w: bool = True,
        narrow: float = 1.0,
        sft_half: bool = True,
    ) -> None:
        super().__init__()
        if decoder_load_path is not None:
            raise ValueError("decoder_load_path is a training option: load a whole GFPGAN state dict instead")
        self.input_is_latent = input_is_latent
        self.different_w = different_w
        self.num_style_feat = num_style_feat
        self.log_size = int(math.log2(out_size))
        ch = channels(narrow * 0.5, channel_multiplier)  # the U-Net is half as wide as the generator
        levels = range(3, self.log_size + 1)  # 8 px … out_size

        # 1. Encoder: 1×1 stem at full size, then ResBlocks down to 4×4.
        self.conv_body_first = nn.Conv2d(3, ch[out_size], 1)
        self.conv_body_down = nn.ModuleList()
        in_ch = ch[out_size]
        for level in range(self.log_size, 2, -1):
            self.conv_body_down.append(ResBlock(in_ch, ch[2 ** (level - 1)], "down"))
            in_ch = ch[2 ** (level - 1)]
        self.final_conv = nn.Conv2d(in_ch, ch[4], 3, 1, 1)

        # 2. Decoder: ResBlocks back up to out_size; each level also emits an RGB image (training only).
        self.conv_body_up = nn.ModuleList()
        in_ch = ch[4]
        for level in levels:
            self.conv_body_up.append(ResBlock(in_ch, ch[2**level], "up"))
            in_ch = ch[2**level]
        self.toRGB = nn.ModuleList(nn.Conv2d(ch[2**level], 3, 1) for level in levels)

        # 3. Bottleneck → style code: one latent per generator layer (different_w) or one for all.
        num_latent = self.log_size * 2 - 2
        self.final_linear = nn.Linear(ch[4] * 4 * 4, (num_latent if different_w else 1) * num_style_feat)

        # 4. The generator and, per level, the SFT scale and shift branches.
        self.stylegan_decoder = StyleGAN2GeneratorCSFT(
            out_size, num_style_feat, num_mlp, channel_multiplier, narrow, sft_half
        )
        if fix_decoder:
            self.stylegan_decoder.requires_grad_(False)
        self.condition_scale = nn.ModuleList()
        self.condition_shift = nn.ModuleList()
        for level in levels:
            c = ch[2**level]
            self.condition_scale.append(_sft_branch(c, c if sft_half else 2 * c))
            self.condition_shift.append(_sft_branch(c, c if sft_half else 2 * c))

    def forward(
        self, x: torch.Tensor, return_rgb: bool = False, randomize_noise: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # 1. Encode, keeping each level's features for the U-Net skips (deepest first).
        feat = F.leaky_relu(self.conv_body_first(x), 0.2)
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.insert(0, feat)
        feat = F.leaky_relu(self.final_conv(feat), 0.2)

        # 2. Style code from the 4×4 bottleneck.
        style = self.final_linear(feat.flatten(1))
        if self.different_w:
            style = style.view(style.shape[0], -1, self.num_style_feat)
        if not self.input_is_latent:
            style = self.stylegan_decoder.style_mlp(style)
        num_latent = self.stylegan_decoder.num_latent
        latent = style if style.ndim == 3 else style[:, None].expand(-1, num_latent, -1)

        # 3. Decode: each level's features give the SFT conditions for the generator.
        conditions, rgbs = [], []
        for skip, up, scale, shift, to_rgb in zip(
            skips, self.conv_body_up, self.condition_scale, self.condition_shift, self.toRGB, strict=True
        ):
            feat = up(feat + skip)
            conditions.append((scale(feat), shift(feat)))
            if return_rgb:
                rgbs.append(to_rgb(feat))

        # 4. Generate.
        return self.stylegan_decoder(latent, conditions, randomize_noise), rgbs
