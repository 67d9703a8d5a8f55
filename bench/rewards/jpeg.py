"""JPEG compressibility reward (DDPO, Black et al. 2023)."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from bench.rewards import REWARDS


def to_pil(image: torch.Tensor) -> Image.Image:
    """[C, H, W] float in [0, 1] -> PIL image (grey for one channel)."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(arr[0], "L") if arr.shape[0] == 1 else Image.fromarray(np.transpose(arr, (1, 2, 0)), "RGB")


@REWARDS.register("jpeg")
class JPEGCompressibility:
    """DDPO: minus the JPEG size in kB at quality 95; smaller files score higher."""

    def __init__(self, world, cfg):
        self.quality = int(cfg.get("quality", 95))

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        sizes = []
        for img in images:
            buf = io.BytesIO()
            to_pil(img).save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        return -torch.tensor(sizes, device=images.device)
