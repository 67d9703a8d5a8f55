"""ImageReward (Xu et al. 2023): a BLIP-based human-preference reward model.

Optional extra: `pip install 'diffrl-bench[gpu-rewards]'` provides the `image-reward` package (module
`ImageReward`); imported only when this reward is built.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from bench.rewards import REWARDS
from bench.rewards._clip_common import (OPENAI_MEAN, OPENAI_STD, ImagePrep, optional_import, require_module, require_path,
                                        reward_device)


@REWARDS.register("imagereward")
class ImageRewardScore:
    """ImageReward's normalised score, batched on device (the same steps as ImageReward.score, without PIL).

    Options: checkpoint_path (ImageReward.pt), med_config_path (its med_config.json; needed offline), batch_size.
    ImageReward's BLIP text side loads the 'bert-base-uncased' tokenizer, which must be in the hub cache offline.
    """

    @staticmethod
    def preflight(cfg: Mapping[str, Any]) -> None:
        """Before any cell starts (bench.runner.components.validate_cell): the paths __init__ will load exist."""
        require_path(cfg, "checkpoint_path", "imagereward", "ImageReward.pt")
        require_path(cfg, "med_config_path", "imagereward", "med_config.json")
        require_module("ImageReward", "imagereward", "image-reward")

    def __init__(self, world, cfg):
        rm = optional_import("ImageReward", "imagereward", "image-reward")
        ckpt = require_path(cfg, "checkpoint_path", "imagereward", "ImageReward.pt")
        med = require_path(cfg, "med_config_path", "imagereward", "med_config.json")
        self.model = rm.load(str(ckpt), device=str(reward_device(world)), med_config=str(med)).eval()
        self.model.requires_grad_(False)
        self.prep = ImagePrep(224, 224, OPENAI_MEAN, OPENAI_STD)
        self.batch_size = int(cfg.get("batch_size", 16))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        m = self.model
        device = next(m.parameters()).device
        out = []
        for i in range(0, len(prompts), self.batch_size):
            px = self.prep(images[i:i + self.batch_size].to(device))
            text = m.blip.tokenizer(prompts[i:i + self.batch_size], padding="max_length", truncation=True,
                                    max_length=35, return_tensors="pt").to(device)
            img_embeds = m.blip.visual_encoder(px)
            img_atts = torch.ones(img_embeds.shape[:-1], dtype=torch.long, device=device)
            h = m.blip.text_encoder(text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=img_embeds,
                                    encoder_attention_mask=img_atts, return_dict=True).last_hidden_state[:, 0, :]
            out.append(((m.mlp(h.float()) - m.mean) / m.std).squeeze(-1))
        return torch.cat(out).to(images.device)
