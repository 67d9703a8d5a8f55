"""HPSv2.1 reward (Wu et al. 2023, "Human Preference Score v2"), as used by DanceGRPO, MixGRPO and TreeGRPO.

Optional extra: `pip install 'diffrl-bench[gpu-rewards]'` provides the `hpsv2` package (its vendored open_clip);
imported only when this reward is built.
"""
from __future__ import annotations

import pickle
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from bench.core.errors import UserError
from bench.rewards import REWARDS
from bench.rewards._clip_common import (OPENAI_MEAN, OPENAI_STD, ImagePrep, optional_import, require_module, require_path,
                                        reward_device)


@REWARDS.register("hpsv2")
class HPSv2:
    """cos(image, prompt) of the HPS v2.1 fine-tuned OpenCLIP ViT-H-14 (the diagonal of HPS's logits, about 0.2-0.35).

    Options: checkpoint_path (HPS_v2.1_compressed.pt; its state_dict holds the whole CLIP, so no OpenCLIP weights
    are downloaded), arch (ViT-H-14), batch_size.
    """

    @staticmethod
    def preflight(cfg: Mapping[str, Any]) -> None:
        """Before any cell starts (bench.runner.components.validate_cell): the paths __init__ will load exist."""
        require_path(cfg, "checkpoint_path", "hpsv2", "HPS_v2.1_compressed.pt")
        require_module("hpsv2.src.open_clip", "hpsv2", "hpsv2")

    def __init__(self, world, cfg):
        oc = optional_import("hpsv2.src.open_clip", "hpsv2", "hpsv2")
        ckpt = require_path(cfg, "checkpoint_path", "hpsv2", "HPS_v2.1_compressed.pt")
        device = reward_device(world)
        arch = str(cfg.get("arch", "ViT-H-14"))
        # pretrained=None: the architecture only; the HPS checkpoint then supplies every weight (no download).
        model = oc.create_model_and_transforms(arch, None, precision="fp32", device=str(device), jit=False,
                                               output_dict=True)[0]
        try:  # tensors only: a checkpoint that needs arbitrary unpickling is refused, never executed
            state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UserError(f"reward 'hpsv2': '{ckpt}' holds more than weights (weights_only=True refused it: "
                            f"{str(e).splitlines()[0][:120]}); valid: HPS_v2.1_compressed.pt") from None
        try:
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except RuntimeError as e:
            raise UserError(f"reward 'hpsv2': '{ckpt}' does not fit OpenCLIP {arch}: {str(e).splitlines()[0]}") from e
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = oc.get_tokenizer(arch)
        size = getattr(getattr(model, "visual", None), "image_size", 224) or 224
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.prep = ImagePrep(size, size, OPENAI_MEAN, OPENAI_STD)
        self.batch_size = int(cfg.get("batch_size", 16))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        scores = []
        for i in range(0, len(prompts), self.batch_size):
            px = self.prep(images[i:i + self.batch_size].to(device))
            text = self.tokenizer(prompts[i:i + self.batch_size]).to(device)
            out = self.model(px, text)
            img = out["image_features"] if isinstance(out, dict) else out[0]
            txt = out["text_features"] if isinstance(out, dict) else out[1]
            scores.append((F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1))
        return torch.cat(scores).to(images.device)
