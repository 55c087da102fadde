"""BiSeNet face parsing (facexlib's ``parsing_bisenet.pth``), in plain torch.

PuLID uses it to blank everything but the face on the aligned 512² crop before EVA-CLIP reads it:
the 19 CelebAMask-HQ classes, of which background, neck, clothes, ears, earring, hair and hat
(:data:`PULID_BACKGROUND_LABELS`) are replaced by white.

The module names follow facexlib's (``cp.resnet.layer1.0.conv1``, ``ffm.convblk.conv``, ...) so its
checkpoint loads strictly; every channel width is read from the state dict. Only the main output
is computed (the two auxiliary heads exist for training; their weights are loaded and unused).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PULID_BACKGROUND_LABELS = (0, 16, 18, 7, 8, 9, 14, 15)


class ConvBNReLU(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if c_in != c_out or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


class ResNet18(nn.Module):
    def __init__(self, stem: int, widths: tuple[int, int, int, int], blocks: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        c_in = stem
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(*(BasicBlock(c_in if j == 0 else width, width, stride if j == 0 else 1)
                                    for j in range(blocks)))
            self.add_module(f"layer{i + 1}", layer)
            c_in = width

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class AttentionRefinement(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(c_in, c_out)
        self.conv_atten = nn.Conv2d(c_out, c_out, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean(dim=(2, 3), keepdim=True))))


class ContextPath(nn.Module):
    def __init__(self, stem: int, widths: tuple[int, int, int, int], head: int) -> None:
        super().__init__()
        self.resnet = ResNet18(stem, widths)
        self.arm16 = AttentionRefinement(widths[2], head)
        self.arm32 = AttentionRefinement(widths[3], head)
        self.conv_head32 = ConvBNReLU(head, head)
        self.conv_head16 = ConvBNReLU(head, head)
        self.conv_avg = ConvBNReLU(widths[3], head, kernel=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(feat32.mean(dim=(2, 3), keepdim=True))
        up32 = F.interpolate(self.arm32(feat32) + avg, feat16.shape[2:], mode="nearest")
        up32 = self.conv_head32(up32)
        up16 = F.interpolate(self.arm16(feat16) + up32, feat8.shape[2:], mode="nearest")
        return feat8, self.conv_head16(up16)


class FeatureFusion(nn.Module):
    def __init__(self, c_in: int, c_out: int, c_mid: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(c_in, c_out, kernel=1)
        self.conv1 = nn.Conv2d(c_out, c_mid, 1, bias=False)
        self.conv2 = nn.Conv2d(c_mid, c_out, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean(dim=(2, 3), keepdim=True)))))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    def __init__(self, c_in: int, c_mid: int, num_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(c_in, c_mid)
        self.conv_out = nn.Conv2d(c_mid, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """``forward(x (B, 3, H, W) ImageNet-normalised) -> class logits (B, classes, H, W)``."""

    def __init__(self, stem: int = 64, widths: tuple[int, int, int, int] = (64, 128, 256, 512), head: int = 128,
                 fuse: int = 256, fuse_mid: int = 64, out_mid: int = 256, aux_mid: int = 64, num_classes: int = 19) -> None:
        super().__init__()
        self.cp = ContextPath(stem, widths, head)
        self.ffm = FeatureFusion(widths[1] + head, fuse, fuse_mid)
        self.conv_out = BiSeNetOutput(fuse, out_mid, num_classes)
        self.conv_out16 = BiSeNetOutput(head, aux_mid, num_classes)
        self.conv_out32 = BiSeNetOutput(head, aux_mid, num_classes)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> BiSeNet:
        sd = dict(state_dict)
        if any(k.startswith("module.") for k in sd):
            sd = {k.removeprefix("module."): v for k, v in sd.items()}
        try:
            widths = tuple(sd[f"cp.resnet.layer{i}.0.conv1.weight"].shape[0] for i in range(1, 5))
            model = cls(
                stem=sd["cp.resnet.conv1.weight"].shape[0], widths=widths,  # type: ignore[arg-type]
                head=sd["cp.arm16.conv.conv.weight"].shape[0], fuse=sd["ffm.convblk.conv.weight"].shape[0],
                fuse_mid=sd["ffm.conv1.weight"].shape[0], out_mid=sd["conv_out.conv.conv.weight"].shape[0],
                aux_mid=sd["conv_out16.conv.conv.weight"].shape[0], num_classes=sd["conv_out.conv_out.weight"].shape[0],
            )
        except KeyError as exc:
            raise ValueError(f"not a BiSeNet face-parsing state dict: no {exc.args[0]!r}") from exc
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"cp\.resnet\.layer1\.(\d+)\.", k))}
        if blocks != {0, 1}:
            raise ValueError(f"BiSeNet expects two residual blocks per stage, found {sorted(blocks)}")
        model.load_state_dict(sd, strict=True)
        return model.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat8, context8 = self.cp(x)
        out = self.conv_out(self.ffm(feat8, context8))
        return F.interpolate(out, x.shape[2:], mode="bilinear", align_corners=True)


def face_only_gray(rgb: torch.Tensor, logits: torch.Tensor,
                   background: tuple[int, ...] = PULID_BACKGROUND_LABELS) -> torch.Tensor:
    """PuLID's EVA-CLIP input: the grey face (BT.601 luma in all three channels), white elsewhere.

    ``rgb`` is (B, 3, H, W) in [0, 1]; ``logits`` the parsing output at the same size.
    """
    labels = logits.argmax(dim=1, keepdim=True)
    is_background = torch.zeros_like(labels, dtype=torch.bool)
    for label in background:
        is_background |= labels == label
    gray = (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]).repeat(1, 3, 1, 1)
    return torch.where(is_background, torch.ones_like(rgb), gray)
