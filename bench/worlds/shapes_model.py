"""The shapes world's base model: SD3's architecture at 24 px in pixel space, and its deterministic pretraining.

The pretraining data are rendered scenes captioned with GenEval-style prompts; on the compositional tasks a
fraction of captions is wrong (label noise: the scene realises a violated version of its caption), which is
what makes the base fluent (clean shapes, right single objects) but misaligned on counting, position and
colour attribution, as SD3.5-M is on GenEval.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from bench.core.errors import UserError
from bench.worlds.sd3_text import SD3PromptEncoder
from bench.worlds.sd3_tiny import build_tiny_components, build_tiny_transformer, tiny_spec
from bench.worlds.shapes_prompts import TASKS, VOCABULARY, build_prompts, scene_for
from bench.worlds.shapes_scene import RESOLUTION, render_batch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BASE_WEIGHTS = WEIGHTS_DIR / "shapes_base.safetensors"

# world.tiny for the shapes world: SD3Transformer2DModel in pixel space (identity VAE) over 3 x 3 patches of 8 x 8
# pixels -- one token per scene cell, so no token has to agree with its neighbours on an object; 4 x 4 patches
# (2 x 2 per cell) drew fragments of patch size at every width and step count tried -- 4 blocks of width 128;
# two small frozen CLIP text encoders and no T5 (its slot is empty), tokenizers that know the world's words.
SHAPES_TINY: dict[str, Any] = {
    "resolution": RESOLUTION,
    "clip_max_length": 12,
    "max_sequence_length": 0,
    "vae": "identity",
    "shift": 1.0,
    "words": sorted(VOCABULARY),
    "transformer": dict(sample_size=RESOLUTION, patch_size=8, in_channels=3, num_layers=4, attention_head_dim=16,
                        num_attention_heads=8, joint_attention_dim=32, caption_projection_dim=128,
                        pooled_projection_dim=32, out_channels=3, pos_embed_max_size=RESOLUTION // 8,
                        dual_attention_layers=(), qk_norm="rms_norm"),
    "clip": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 projection_dim=16, max_position_embeddings=12, hidden_act="gelu", layer_norm_eps=1e-5),
}

PRETRAIN: dict[str, Any] = {
    "version": 3,
    "seed": 0,
    "threads": 1,             # torch intra-op threads: part of the config because float reductions depend on it
    "steps": 3000,
    "batch": 32,
    "lr": 1e-3,
    "warmup": 100,
    "schedule": "cosine",     # to zero at `steps` (so a snapshot at step N is not the N-step run)
    "weight_decay": 0.0,
    "ema": 0.999,
    "init": "adaln_zero",     # DiT's init: blocks start as the identity
    # The network predicts x0 and the model returns v = (x_t - x0_hat) / max(t, t_min) (JiT, Li & He 2025): an
    # 8 x 8 x 3 patch is 192 numbers, more than the width, and a velocity (noise minus data) must carry all of
    # them, while clean patches lie on a low-dimensional set; the loss is the velocity loss with the same t_min.
    "prediction": "x0",
    "t_min": 0.05,
    "caption_dropout": 0.1,   # CFG's unconditional fraction (empty prompt)
    # t = sigmoid(N(mean, std)): more weight toward noise, where x0-prediction's velocity loss weighs little
    "timesteps": "logit_normal",
    "t_mean": 0.8,
    "t_std": 0.8,
    # Probability that a caption is true (otherwise the scene violates the task's requirement): single objects
    # and colours always true, the compositional tasks carry the label noise (the misalignment)
    # (two_object 0.6, counting 0.35, position and attribution 0.3 scored 0.56 at CFG 3, above the 0.5 target)
    "fidelity": {"single_object": 1.0, "two_object": 0.25, "counting": 0.3, "colors": 1.0, "position": 0.3,
                 "color_attr": 0.25},
    "tiny": SHAPES_TINY,
    "tiny_seed": 0,
}


@functools.cache
def shapes_transformer_class() -> type:
    """ShapesTransformer, defined at first use: planning a grid imports every world module, and diffusers takes
    2-4 s to import."""
    from diffusers import SD3Transformer2DModel

    class ShapesTransformer(SD3Transformer2DModel):
        """diffusers' SD3Transformer2DModel whose output is read as x0: forward returns the flow velocity
        v = (x_t - x0_hat) / max(t, t_min), so samplers, estimators and LoRA see the SD3 velocity interface."""

        t_min = PRETRAIN["t_min"]

        def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            kwargs["return_dict"] = False
            x0_hat = super().forward(hidden_states, *args, timestep=timestep, **kwargs)[0]
            t = (timestep.float() / 1000).clamp(min=self.t_min).view(-1, *[1] * (hidden_states.dim() - 1))
            return ((hidden_states - x0_hat) / t.to(hidden_states.dtype),)

    ShapesTransformer.__qualname__ = "ShapesTransformer"  # pickles as bench.worlds.shapes_model.ShapesTransformer
    return ShapesTransformer


def __getattr__(name: str) -> Any:
    if name == "ShapesTransformer":
        return shapes_transformer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_transformer(cfg: Mapping[str, Any] = PRETRAIN) -> torch.nn.Module:
    """The base's fresh transformer (deterministic in cfg['tiny_seed'], as sd3_tiny.build_tiny_transformer)."""
    if cfg.get("prediction", "velocity") == "velocity":
        return build_tiny_transformer(int(cfg["tiny_seed"]), cfg["tiny"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg["tiny_seed"]) + 5)
        model = shapes_transformer_class()(**tiny_spec(cfg["tiny"])["transformer"])
    model.t_min = float(cfg["t_min"])
    return model.eval()


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


def sample_timesteps(n: int, cfg: Mapping[str, Any], gen: torch.Generator) -> torch.Tensor:
    """Training times t in (0, 1): `uniform`, or `logit_normal` (sigmoid of N(t_mean, t_std), SD3's density)."""
    kind = str(cfg["timesteps"])
    if kind == "uniform":
        return torch.rand(n, generator=gen)
    if kind == "logit_normal":
        mean, std = float(cfg.get("t_mean", 0.0)), float(cfg.get("t_std", 1.0))
        return torch.sigmoid(mean + std * torch.randn(n, generator=gen))
    raise UserError(f"pretraining timesteps {kind!r}; valid: uniform, logit_normal")


def lr_factor(step: int, cfg: Mapping[str, Any]) -> float:
    """Linear warmup, then `constant` or `cosine` decay to zero at cfg['steps']."""
    f = min(1.0, step / max(1, int(cfg["warmup"])))
    if cfg.get("schedule", "constant") == "cosine":
        f *= 0.5 * (1 + np.cos(np.pi * min(1.0, step / int(cfg["steps"]))))
    return float(f)


def adaln_zero_init(model: torch.nn.Module) -> None:
    """DiT's adaLN-Zero initialisation: every modulation and the output projection start at zero, so each block
    starts as the identity (diffusers' SD3Transformer2DModel starts them random)."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and (name.endswith(("norm1.linear", "norm1_context.linear"))
                                                     or name in ("norm_out.linear", "proj_out")):
                mod.weight.zero_()
                mod.bias.zero_()


def pretrain(cfg: Mapping[str, Any] = PRETRAIN, log: Callable[[str], None] = print,
             snapshot: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
             snapshot_every: int = 0) -> dict[str, torch.Tensor]:
    """Rectified-flow pretraining of the SD3 transformer (velocity loss); returns the EMA weights."""
    seed = int(cfg["seed"])
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    encoder = text_encoder(int(cfg["tiny_seed"]))
    model = build_transformer(cfg).train()
    if cfg.get("init") == "adaln_zero":
        adaln_zero_init(model)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    decay = float(cfg["ema"])
    for step in range(1, int(cfg["steps"]) + 1):
        for g in opt.param_groups:
            g["lr"] = float(cfg["lr"]) * lr_factor(step, cfg)
        x0, captions = sample_batch(rng, int(cfg["batch"]), cfg)
        cond = encoder(captions)
        t = sample_timesteps(len(captions), cfg, gen)
        eps = torch.randn(x0.shape, generator=gen)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        v = model(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=cond["prompt_embeds"],
                  pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
        if cfg.get("prediction") == "x0":  # the model's clamped velocity: eps - x0 wherever t >= t_min
            target = (xt - x0) / t.clamp(min=float(cfg["t_min"])).view(-1, 1, 1, 1)
        else:
            target = eps - x0
        loss = (v - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(decay, (1 + step) / (10 + step))  # EMA warmup: early averages do not remember the init
        with torch.no_grad():
            for k, p in model.state_dict().items():
                ema[k].mul_(d).add_(p.detach(), alpha=1 - d) if p.dtype.is_floating_point else ema[k].copy_(p)
        if step % 50 == 0 or step == 1:
            log(f"step {step} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e}")
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
    model = build_transformer(cfg)
    model.load_state_dict(load_file(str(path)))
    return model.eval()
