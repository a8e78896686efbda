"""ESRGAN's RRDBNet (Wang et al. 2018; layout and names as in basicsr), and its dense blocks fused.

A residual dense block runs five 3×3 convolutions, the k-th over the block input and all k-1 earlier
outputs concatenated: 32 output channels each but the last's 64, so each convolution is a GEMM only
32 wide, which tensor cores fill poorly (Real-ESRGAN ran at 16% of an H200's matmul peak), and each
re-reads every earlier feature map. A convolution is linear in its input channels, so the same block
can run feature map by feature map instead (``FusedDenseBlock``): when a feature map exists, one
convolution computes its contribution to every later convolution at once (the input's to all five:
192 channels wide; x1's to the four after it: 160; ...), added into a running sum whose first 32
channels are then the next feature map. The same products and sums, five wider convolutions, every
feature map read once; the numbers differ from the plain block by float rounding only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["RRDB", "FusedDenseBlock", "RRDBNet", "ResidualDenseBlock"]


class ResidualDenseBlock(nn.Module):
    """Five 3×3 convolutions, each fed the block input and all earlier outputs; residual × 0.2."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class FusedDenseBlock(nn.Module):
    """A ``ResidualDenseBlock`` computed feature map by feature map (module docs): ``weights[j]``
    holds, stacked along the output channels, the slice of every convolution from j+1 on that reads
    feature map j (0 = the block input)."""

    def __init__(self, block: ResidualDenseBlock) -> None:
        super().__init__()
        convs = [block.conv1, block.conv2, block.conv3, block.conv4, block.conv5]
        self.grow = block.conv1.out_channels
        widths = [block.conv1.in_channels] + [self.grow] * 4  # channels of each feature map
        starts = [sum(widths[:j]) for j in range(len(widths))]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.cat([c.weight[:, start : start + width] for c in convs[j:]]).contiguous())
            for j, (start, width) in enumerate(zip(starts, widths, strict=True))
        )
        self.bias = nn.Parameter(torch.cat([c.bias for c in convs]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Running sums of conv1..conv5 (32 + 32 + 32 + 32 + 64 channels), each new feature map's
        # share added as it comes; the first 32 channels are always the next feature map's input.
        sums = F.conv2d(x, self.weights[0], self.bias, padding=1)
        for weight in list(self.weights)[1:]:
            feature = F.leaky_relu(sums[:, : self.grow], 0.2)
            sums = sums[:, self.grow :] + F.conv2d(feature, weight, padding=1)
        return sums * 0.2 + x


class RRDB(nn.Module):
    """Three residual dense blocks in a row; residual × 0.2."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.rdb1: nn.Module = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2: nn.Module = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3: nn.Module = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """×4 RRDBNet (the ×4 layout only: no pixel-unshuffle front end for ×1/×2 variants)."""

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
        scale: int = 4,
    ) -> None:
        super().__init__()
        if scale != 4:
            raise ValueError("only the ×4 RRDBNet layout is implemented")
        self.scale = scale
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))

    def fuse_dense_blocks(self) -> RRDBNet:
        """Replace every dense block by its ``FusedDenseBlock`` (after the weights are loaded: the
        state dict's names change); returns self."""
        for rrdb in self.body:
            for name in ("rdb1", "rdb2", "rdb3"):
                block = getattr(rrdb, name)
                if isinstance(block, ResidualDenseBlock):
                    setattr(rrdb, name, FusedDenseBlock(block))
        return self
