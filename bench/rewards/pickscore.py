"""PickScore reward (Kirstain et al. 2023, "Pick-a-Pic"), as used by Flow-GRPO and DiffusionNFT."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from bench.rewards import REWARDS
from bench.rewards._clip_common import clip_embeddings, clip_paths, load_clip, reward_device
from bench.worlds.sd3_components import parse_dtype


@REWARDS.register("pickscore")
class PickScore:
    """logit_scale * cos(image, prompt) of the PickScore_v1 CLIP-H model, divided by `scale` (Flow-GRPO: 26).

    Options: model_path (PickScore_v1 weights, a transformers CLIPModel folder), processor_path (its processor,
    e.g. a CLIP-ViT-H-14-laion2B folder; default model_path), scale, dtype, batch_size, tiny.
    """

    @staticmethod
    def preflight(cfg: Mapping[str, Any]) -> None:
        """Before any cell starts (bench.runner.components.validate_cell): the paths __init__ will load exist."""
        clip_paths(cfg, "pickscore", "PickScore_v1")

    def __init__(self, world, cfg):
        self.scale = float(cfg.get("scale", 1.0))
        self.batch_size = int(cfg.get("batch_size", 32))
        dtype = parse_dtype(cfg.get("dtype", "float32"), "world.reward_options.pickscore.dtype")
        self.model, self.tok, self.prep = load_clip(cfg, "pickscore", "PickScore_v1", dtype, reward_device(world))

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img, txt = clip_embeddings(self.model, self.tok, self.prep, images, prompts, self.batch_size)
        logit_scale = self.model.logit_scale.float().exp()
        return (logit_scale * (img * txt).sum(-1) / self.scale).to(images.device)
