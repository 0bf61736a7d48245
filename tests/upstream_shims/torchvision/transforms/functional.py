"""TEST-ONLY shim: torchvision's ``center_crop`` for tensors ``[..., H, W]``.

Same rule as torchvision for a crop no larger than the input: the top-left corner is
``round((H - h) / 2), round((W - w) / 2)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def center_crop(img: torch.Tensor, output_size: int | Sequence[int]) -> torch.Tensor:
    if isinstance(output_size, int):
        h, w = output_size, output_size
    else:
        h, w = (output_size[0], output_size[0]) if len(output_size) == 1 else output_size[:2]
    height, width = img.shape[-2:]
    if h > height or w > width:
        raise ValueError("test shim: center_crop does not pad")
    top = int(round((height - h) / 2.0))
    left = int(round((width - w) / 2.0))
    return img[..., top : top + h, left : left + w]
