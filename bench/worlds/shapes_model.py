"""The shapes world's base model: SD3's architecture at 24 px in pixel space, and its deterministic pretraining.

The pretraining data are rendered scenes captioned with GenEval-style prompts; on the compositional tasks a
fraction of captions is wrong (label noise: the scene realises a violated version of its caption), which is
what makes the base fluent (clean shapes, right single objects) but misaligned on counting, position and
colour attribution, as SD3.5-M is on GenEval.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from bench.core.errors import UserError
from bench.worlds.sd3_text import SD3PromptEncoder
from bench.worlds.sd3_tiny import build_tiny_components, build_tiny_transformer
from bench.worlds.shapes_prompts import TASKS, VOCABULARY, build_prompts, scene_for
from bench.worlds.shapes_scene import RESOLUTION, render_batch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BASE_WEIGHTS = WEIGHTS_DIR / "shapes_base.safetensors"

# world.tiny for the shapes world: SD3Transformer2DModel in pixel space (identity VAE) over 6 x 6 patches of 4 x 4
# pixels (a scene cell is 2 x 2 patches; 8 x 8 patches would need a width >= 192 to carry a patch's noise);
# two small frozen CLIP text encoders and no T5 (its slot is empty), tokenizers that know the world's words.
SHAPES_TINY: dict[str, Any] = {
    "resolution": RESOLUTION,
    "clip_max_length": 12,
    "max_sequence_length": 0,
    "vae": "identity",
    "shift": 1.0,
    "words": sorted(VOCABULARY),
    "transformer": dict(sample_size=RESOLUTION, patch_size=4, in_channels=3, num_layers=4, attention_head_dim=16,
                        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64,
                        pooled_projection_dim=32, out_channels=3, pos_embed_max_size=RESOLUTION // 4,
                        dual_attention_layers=(), qk_norm="rms_norm"),
    "clip": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 projection_dim=16, max_position_embeddings=12, hidden_act="gelu", layer_norm_eps=1e-5),
}

# Probability that a pretraining caption is true (otherwise the scene violates the task's requirement).
PRETRAIN: dict[str, Any] = {
    "version": 1,
    "seed": 0,
    "steps": 3000,
    "batch": 32,
    "lr": 2e-3,
    "warmup": 100,            # linear warmup, then constant: a prefix of the run is the run with fewer steps
    "weight_decay": 0.0,
    "ema": 0.999,
    "caption_dropout": 0.1,   # CFG's unconditional fraction (empty prompt)
    # uniform t (rectified flow), not SD3's logit-normal: logit-normal leaves t > 0.8 nearly untrained, and in pixel
    # space at 24 px sampling from pure noise then drew patch-sized blobs after 1000 steps (denoising at t <= 0.5
    # was already sharp)
    "timesteps": "uniform",
    "fidelity": {"single_object": 1.0, "two_object": 0.8, "counting": 0.35, "colors": 0.8, "position": 0.3,
                 "color_attr": 0.3},
    "tiny": SHAPES_TINY,
    "tiny_seed": 0,
}


def config_hash(cfg: Mapping[str, Any]) -> str:
    """A short hash of a pretraining config (architecture included): the shipped weights carry it."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=list).encode()).hexdigest()[:16]


def text_encoder(seed: int = 0) -> SD3PromptEncoder:
    """The frozen text stack (two tiny CLIPs, no T5) the world and the pretraining share."""
    comps = build_tiny_components(seed, SHAPES_TINY)
    comps["text_encoder_3"], comps["tokenizer_3"] = None, None
    return SD3PromptEncoder(comps, torch.device("cpu"), SHAPES_TINY["max_sequence_length"],
                            joint_attention_dim=SHAPES_TINY["transformer"]["joint_attention_dim"])


def sample_batch(rng: np.random.Generator, n: int, cfg: Mapping[str, Any]) -> tuple[torch.Tensor, list[str]]:
    """n (image in [-1, 1], caption) pairs: task uniform, prompt uniform within it, captions true w.p. fidelity."""
    by_task: dict[str, list[dict[str, Any]]] = {t: [] for t in TASKS}
    for m in build_prompts():
        by_task[m["tag"]].append(m)
    scenes, captions = [], []
    for _ in range(n):
        task = TASKS[int(rng.integers(len(TASKS)))]
        meta = by_task[task][int(rng.integers(len(by_task[task])))]
        faithful = bool(rng.random() < float(cfg["fidelity"][task]))
        scenes.append(scene_for(meta, rng, faithful))
        captions.append("" if rng.random() < float(cfg["caption_dropout"]) else meta["prompt"])
    return render_batch(scenes) * 2 - 1, captions


def pretrain(cfg: Mapping[str, Any] = PRETRAIN, log: Callable[[str], None] = print,
             snapshot: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
             snapshot_every: int = 0) -> dict[str, torch.Tensor]:
    """Rectified-flow pretraining of the SD3 transformer (t uniform or SD3's logit-normal); returns the EMA weights."""
    seed = int(cfg["seed"])
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    encoder = text_encoder(int(cfg["tiny_seed"]))
    model = build_tiny_transformer(int(cfg["tiny_seed"]), cfg["tiny"]).train()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    decay, warm = float(cfg["ema"]), max(1, int(cfg["warmup"]))
    for step in range(1, int(cfg["steps"]) + 1):
        for g in opt.param_groups:
            g["lr"] = float(cfg["lr"]) * min(1.0, step / warm)
        x0, captions = sample_batch(rng, int(cfg["batch"]), cfg)
        cond = encoder(captions)
        t = (torch.rand(len(captions), generator=gen) if cfg["timesteps"] == "uniform"
             else torch.sigmoid(torch.randn(len(captions), generator=gen)))
        eps = torch.randn(x0.shape, generator=gen)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        v = model(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=cond["prompt_embeds"],
                  pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
        loss = (v - (eps - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(decay, (1 + step) / (10 + step))  # EMA warmup: early averages do not remember the init
        with torch.no_grad():
            for k, p in model.state_dict().items():
                ema[k].mul_(d).add_(p.detach(), alpha=1 - d) if p.dtype.is_floating_point else ema[k].copy_(p)
        if step % 50 == 0 or step == 1:
            log(f"step {step} loss {loss.item():.4f}")
        if snapshot is not None and snapshot_every and step % snapshot_every == 0:
            snapshot(step, ema)
    return ema


def save_weights(state: Mapping[str, torch.Tensor], path: Path, cfg: Mapping[str, Any]) -> None:
    """safetensors with the pretraining config and its hash in the header metadata."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              metadata={"config_hash": config_hash(cfg), "config": json.dumps(cfg, sort_keys=True, default=list)})


def load_base_transformer(path: Path = BASE_WEIGHTS, cfg: Mapping[str, Any] = PRETRAIN) -> torch.nn.Module:
    """The pretrained base (eval mode); UserError if the file is missing or was made by another config."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise UserError(f"shapes base weights {path} not found; create them with `python scripts/pretrain_shapes.py`")
    with safe_open(str(path), "pt") as f:
        got = (f.metadata() or {}).get("config_hash")
    if got != config_hash(cfg):
        raise UserError(f"shapes base weights {path} have config hash {got}, but scripts/pretrain_shapes.py's config "
                        f"hashes to {config_hash(cfg)}; rerun the script (or restore the weights)")
    model = build_tiny_transformer(int(cfg["tiny_seed"]), cfg["tiny"])
    model.load_state_dict(load_file(str(path)))
    return model.eval()
