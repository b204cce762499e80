"""``data.resize``: every image of a run resized to ``side x side`` pixels, e.g. sklearn's 8x8 ``digits`` at
28x28 so that a model pre-trained on MNIST can be fine-tuned on them (the DAT paper's Figure 2 recipe).

Bilinear interpolation (antialiased when shrinking), values clamped to [0, 1]. In-memory datasets
(``TensorDataset``) are resized once; other datasets are wrapped and resized per item.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from .spec import DatasetSpec


def resize_images(x: torch.Tensor, side: int) -> torch.Tensor:
    """``x`` of shape (N, C, H, W) or (C, H, W) in [0, 1] resized to ``side x side`` (bilinear), in [0, 1]."""
    single = x.dim() == 3
    xb = x.unsqueeze(0) if single else x
    if xb.shape[-2:] == (side, side):
        return x
    shrink = side < max(xb.shape[-2:])
    out = F.interpolate(xb.float(), size=(side, side), mode="bilinear", align_corners=False,
                        antialias=shrink).clamp_(0.0, 1.0)
    return out[0] if single else out


class ResizedDataset(Dataset):
    """``(resize_images(x, side), y)`` for every item of ``base`` (datasets that are not in memory)."""

    def __init__(self, base: Dataset, side: int) -> None:
        self.base, self.side = base, side

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return resize_images(x, self.side), y


def resize_dataset(ds: Dataset, side: int) -> Dataset:
    """``ds`` with every image at ``side x side``: a new ``TensorDataset`` for in-memory data, else a wrapper."""
    if isinstance(ds, TensorDataset):
        x, y = ds.tensors
        return TensorDataset(resize_images(x, side), y)
    if isinstance(ds, Subset) and isinstance(ds.dataset, TensorDataset):
        x, y = ds.dataset.tensors
        idx = torch.as_tensor(ds.indices, dtype=torch.long)
        return TensorDataset(resize_images(x[idx], side), y[idx])
    return ResizedDataset(ds, side)


def resized_spec(spec: DatasetSpec, side: int) -> DatasetSpec:
    """``spec`` with ``image_size = side`` (0 = unchanged): what the model is built for."""
    return spec if side <= 0 else dataclasses.replace(spec, image_size=side)
