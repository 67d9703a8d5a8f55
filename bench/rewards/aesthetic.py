"""LAION aesthetic predictor (Schuhmann et al. 2022): a head on normalised CLIP ViT-L/14 image embeddings (DDPO's reward)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from bench.core.errors import UserError
from bench.rewards import REWARDS
from bench.rewards._clip_common import clip_embeddings, clip_paths, load_clip, require_path, reward_device
from bench.worlds.sd3_components import parse_dtype


def load_head(path: Path) -> nn.Sequential:
    """The aesthetic head from its state dict: v1 is one Linear(768, 1) ('weight', 'bias'); v2 (improved predictor,
    as used by DDPO) is 'layers.{0,2,4,6,7}' Linears with dropout between and no activations."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    linears = []
    if "weight" in sd and "bias" in sd:
        linears = [("", sd["weight"], sd["bias"])]
    else:
        idx = sorted({int(m.group(1)) for k in sd if (m := re.fullmatch(r"layers\.(\d+)\.weight", k))})
        linears = [(str(i), sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"]) for i in idx]
    if not linears or linears[-1][1].shape[0] != 1:
        raise UserError(f"'{path}' is not a LAION aesthetic head (expected 'weight'/'bias' of a Linear(768, 1) or "
                        f"'layers.N.weight' of the improved predictor's MLP); keys: {sorted(sd)[:6]}")
    layers = []
    for _, w, b in linears:
        lin = nn.Linear(w.shape[1], w.shape[0])
        lin.weight.data.copy_(w)
        lin.bias.data.copy_(b)
        layers.append(lin)
    return nn.Sequential(*layers)


@REWARDS.register("aesthetic")
class Aesthetic:
    """LAION aesthetic score (about 1-10): head(normalise(CLIP-L image embedding)); prompt-independent.

    Options: model_path (openai/clip-vit-large-patch14 as a transformers folder), head_path (the LAION head, e.g.
    sac+logos+ava1-l14-linearMSE.pth or sa_0_4_vit_l_14_linear.pth), dtype, batch_size, tiny (random head too).
    """

    @staticmethod
    def preflight(cfg: Mapping[str, Any]) -> None:
        """Before any cell starts (bench.runner.components.validate_cell): the paths __init__ will load exist."""
        clip_paths(cfg, "aesthetic", "clip-vit-large-patch14")
        if not (cfg.get("tiny") and not cfg.get("head_path")):
            require_path(cfg, "head_path", "aesthetic", "sac+logos+ava1-l14-linearMSE.pth")

    def __init__(self, world, cfg):
        self.batch_size = int(cfg.get("batch_size", 32))
        dtype = parse_dtype(cfg.get("dtype", "float32"), "world.reward_options.aesthetic.dtype")
        device = reward_device(world)
        self.model, self.tok, self.prep = load_clip(cfg, "aesthetic", "clip-vit-large-patch14", dtype, device)
        dim = self.model.config.projection_dim
        if cfg.get("tiny") and not cfg.get("head_path"):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(cfg.get("tiny_seed", 0)))
                self.head = nn.Sequential(nn.Linear(dim, 1))
        else:
            self.head = load_head(require_path(cfg, "head_path", "aesthetic", "sac+logos+ava1-l14-linearMSE.pth"))
        if self.head[0].in_features != dim:
            raise UserError(f"reward 'aesthetic': the head takes {self.head[0].in_features}-d embeddings but the CLIP "
                            f"model gives {dim}-d; use CLIP ViT-L/14 with the LAION head")
        self.head = self.head.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img, _ = clip_embeddings(self.model, self.tok, self.prep, images, None, self.batch_size)
        return self.head(img).squeeze(-1).to(images.device)
