"""The network's input, computed inside the model: HU slices + their geometry → (N, C, size, size).

One implementation of the per-slice pixel work (``medqc.analysis.preprocess`` describes it): training
calls this module on the slices it caches, and ``medqc export onnx`` exports it in front of the network,
so ONNX Runtime runs it in its own threads on the CPU and TensorRT or torch batched on the GPU. The host
only computes the geometry arrays (``medqc.analysis.preprocess.geometry``).

Resampling is separable: a gather of the source rows each output row reads, weighted and summed, then
the same over columns (ONNX Gather, Mul, ReduceSum: dynamic rows, columns and tap counts). Window
channels read -1 and the mask 0 outside the resampled image (the pad).
"""

from __future__ import annotations

import torch
from torch import nn

from medqc.analysis.preprocess import PreprocessParams


class SliceInput(nn.Module):
    def __init__(self, params: PreprocessParams):
        super().__init__()
        self.params = params
        self.pad_below_hu = float(params.pad_below_hu)
        self.windows = tuple((float(lo), float(hi)) for lo, hi in params.windows)
        self.fov_mask = bool(params.fov_mask)

    def forward(self, hu: torch.Tensor, row_index: torch.Tensor, row_weight: torch.Tensor, col_index: torch.Tensor,
                col_weight: torch.Tensor, row_valid: torch.Tensor, col_valid: torch.Tensor) -> torch.Tensor:
        """hu (N, H, W) float32; row_* / col_* from :class:`medqc.analysis.preprocess.Geometry`."""
        if torch.is_autocast_enabled(hu.device.type):  # HU up to 3071 and the resampling sums need FP32
            with torch.autocast(device_type=hu.device.type, enabled=False):
                return self.forward(hu.float(), row_index, row_weight.float(), col_index, col_weight.float(),
                                    row_valid.float(), col_valid.float())
        inside = (hu >= self.pad_below_hu).to(hu.dtype)
        img = (hu + 1000.0) * inside - 1000.0  # padding → air (-1000 HU); arithmetic runs vectorised in ONNX Runtime
        x = torch.stack([img, inside], 1) if self.fov_mask else img[:, None]  # (N, P, H, W)
        n, p, w = x.shape[0], x.shape[1], x.shape[3]
        s_r, k_r = row_index.shape[0], row_index.shape[1]
        s_c, k_c = col_index.shape[0], col_index.shape[1]
        # rows: (N, P, S*Kr, W) → weighted sum over the Kr taps → (N, P, S, W)
        x = x.index_select(2, row_index.reshape(-1)).reshape(n, p, s_r, k_r, w)
        x = torch.matmul(row_weight.reshape(s_r, 1, k_r), x).reshape(n, p, s_r, w)
        # columns, on the transposed image so that the gather copies whole rows again (a gather along the
        # last axis copies element by element: ~8x slower under ONNX Runtime): (N, P, W, S) → (N, P, S, S)
        x = x.transpose(2, 3).index_select(2, col_index.reshape(-1)).reshape(n, p, s_c, k_c, s_r)
        x = torch.matmul(col_weight.reshape(s_c, 1, k_c), x).reshape(n, p, s_c, s_r).transpose(2, 3)
        valid = (row_valid.reshape(-1, 1) * col_valid.reshape(1, -1)) > 0.5
        img = x[:, 0]
        chans = []
        for lo, hi in self.windows:  # (hu - lo) * 2 / (hi - lo) - 1, clipped to [-1, 1]; -1 in the pad
            c = ((img - lo) * (2.0 / (hi - lo)) - 1.0).clamp(-1.0, 1.0)
            chans.append(torch.where(valid, c, torch.full_like(c, -1.0)))
        if self.fov_mask:
            chans.append(x[:, 1])
        return torch.stack(chans, 1)


class SliceModel(nn.Module):
    """The exported model: :class:`SliceInput` followed by the network (``forward(image) -> (logits,
    position)``). Inputs named as ``medqc.analysis.preprocess.INPUT_NAMES``."""

    def __init__(self, net: nn.Module, params: PreprocessParams):
        super().__init__()
        self.pre = SliceInput(params)
        self.net = net

    def forward(self, hu, row_index, row_weight, col_index, col_weight, row_valid, col_valid):
        return self.net(self.pre(hu, row_index, row_weight, col_index, col_weight, row_valid, col_valid))


def as_tensors(feeds: dict) -> list[torch.Tensor]:
    """The graph's inputs (numpy, by name) as CPU tensors in the forward's order."""
    import numpy as np

    from medqc.analysis.preprocess import INPUT_NAMES

    return [torch.from_numpy(a if a.flags.writeable else a.copy()) for a in (np.asarray(feeds[k]) for k in INPUT_NAMES)]


def prepare(slices, params: PreprocessParams, dtype=None):
    """Preprocess ``slices`` ([(hu (H, W), pixel_spacing, orientation or None)]) in torch, on the CPU, one
    batch per geometry: (N, C, size, size) float32 numpy (or ``dtype``) in input order. For training
    caches and evaluations; the agent runs the exported graph instead."""
    import numpy as np

    from medqc.analysis.preprocess import group_by_geometry

    slices = list(slices)
    out = np.empty((len(slices), params.channels, params.size, params.size), dtype or np.float32)
    if not slices:
        return out
    pre = SliceInput(params)
    groups = group_by_geometry([(np.shape(hu), ps, ori) for hu, ps, ori in slices], params)
    with torch.inference_mode():
        for geom, idx in groups:
            feeds = geom.feeds(np.stack([np.asarray(slices[k][0], np.float32) for k in idx]))
            x = pre(*as_tensors(feeds))
            out[idx] = x.numpy().astype(out.dtype, copy=False)
    return out
