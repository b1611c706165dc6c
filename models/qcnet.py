"""QCNet: one small CT backbone, two heads (artifact logits, craniocaudal position).

Input: (N, C, S, S) float32 from the preprocessing in front of it (``medqc.models.slice_input``) — HU windows stacked as channels plus
the field-of-view mask; no ImageNet stem. The first two stages are plain 3×3 convolutions with stride 2
(they see full-resolution texture: noise grain, thin rings, streaks), then depthwise-separable inverted
residual blocks keep the cost at ~0.1–0.2 GFLOP per 256² slice so ONNX Runtime on two CPU cores stays far
above the agent's 240 slices/s budget.

Heads read global average *and* global max pooled features (a small metal bead or one bright ring is a
local event that an average dilutes). The position head predicts reference millimetres below the vertex
(``medqc.analysis.anatomy``) divided by 1000 internally; the graph multiplies back so the exported output is in
reference mm directly.
"""

from __future__ import annotations

import torch
from torch import nn

POSITION_SCALE_MM = 1000.0


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2-style block: 1×1 expand → 3×3 depthwise (stride) → 1×1 project, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 2):
        super().__init__()
        mid = cin * expand
        self.block = nn.Sequential(
            _conv_bn(cin, mid, k=1),
            _conv_bn(mid, mid, k=3, stride=stride, groups=mid),
            _conv_bn(mid, cout, k=1, act=False),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class QCNet(nn.Module):
    def __init__(self, in_channels: int = 4, num_labels: int = 5, width: int = 16, dropout: float = 0.1):
        super().__init__()
        if in_channels < 1 or num_labels < 1 or width < 4:
            raise ValueError(f"bad QCNet size: in_channels={in_channels}, num_labels={num_labels}, width={width}")
        w = width
        self.in_channels = in_channels
        self.num_labels = num_labels
        self.features = nn.Sequential(
            _conv_bn(in_channels, w, stride=2),  # S/2
            _conv_bn(w, 2 * w, stride=2),  # S/4
            InvertedResidual(2 * w, 2 * w, 1),
            InvertedResidual(2 * w, 3 * w, 2),  # S/8
            InvertedResidual(3 * w, 3 * w, 1),
            InvertedResidual(3 * w, 4 * w, 2),  # S/16
            InvertedResidual(4 * w, 4 * w, 1),
            InvertedResidual(4 * w, 6 * w, 2),  # S/32
            InvertedResidual(6 * w, 6 * w, 1),
            _conv_bn(6 * w, 8 * w, k=1),
        )
        feat = 8 * w * 2  # avg + max pooled
        self.dropout = nn.Dropout(dropout)
        self.artifact_head = nn.Sequential(nn.Linear(feat, 64), nn.ReLU(inplace=True), nn.Linear(64, num_labels))
        self.position_head = nn.Sequential(nn.Linear(feat, 64), nn.ReLU(inplace=True), nn.Linear(64, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.02)
                nn.init.zeros_(m.bias)
        # start the position output near the middle of the body scale
        nn.init.constant_(self.position_head[-1].bias, 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        pooled = self.dropout(pooled)
        logits = self.artifact_head(pooled)
        position = self.position_head(pooled) * POSITION_SCALE_MM
        return logits, position


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, in_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates ×2 of convolutions and linear layers for one input of shape (C, S, S)."""
    total = 0
    hooks = []

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += 2 * out.numel() * k

    def lin_hook(m: nn.Linear, inp, out):
        nonlocal total
        total += 2 * m.in_features * m.out_features * (out.numel() // m.out_features)

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lin_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *in_shape)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total
