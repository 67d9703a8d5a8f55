"""CLIPScore reward (Hessel et al. 2021): w * max(cos(image, prompt), 0) with a transformers CLIPModel."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from bench.rewards import REWARDS
from bench.rewards._clip_common import clip_embeddings, clip_paths, load_clip, reward_device
from bench.worlds.sd3_components import parse_dtype


@REWARDS.register("clipscore")
class CLIPScore:
    """CLIP-S = w max(cos, 0), w = 2.5 as in the paper; options: model_path (e.g. clip-vit-large-patch14), w, tiny."""

    @staticmethod
    def preflight(cfg: Mapping[str, Any]) -> None:
        """Before any cell starts (bench.runner.components.validate_cell): the paths __init__ will load exist."""
        clip_paths(cfg, "clipscore", "clip-vit-large-patch14")

    def __init__(self, world, cfg):
        self.w = float(cfg.get("w", 2.5))
        self.batch_size = int(cfg.get("batch_size", 32))
        dtype = parse_dtype(cfg.get("dtype", "float32"), "world.reward_options.clipscore.dtype")
        self.model, self.tok, self.prep = load_clip(cfg, "clipscore", "clip-vit-large-patch14", dtype,
                                                    reward_device(world))

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img, txt = clip_embeddings(self.model, self.tok, self.prep, images, prompts, self.batch_size)
        return (self.w * (img * txt).sum(-1).clamp_min(0)).to(images.device)
