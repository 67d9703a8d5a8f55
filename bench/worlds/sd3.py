"""The sd3 world: Stable Diffusion 3(.5) with LoRA, prompt files and reward models (DESIGN section 11)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

from bench.core.errors import UserError
from bench.core.meter import ComputeMeter
from bench.core.policy import Policy, PolicyCall
from bench.worlds.prompts import PromptSet, train_eval_split
from bench.rewards.combine import WeightedReward
from bench.core.schema import Option
from bench.worlds import WORLDS
from bench.worlds.base import World
from bench.worlds.sd3_components import (VARIANTS, load_components, load_transformer, load_transformer_config,
                                         parse_dtype, resolve_model_path, variant_spec)
from bench.worlds.sd3_policy import DEFAULT_TARGETS, SD3Policy, add_lora
from bench.worlds.sd3_text import SD3PromptEncoder
from bench.worlds.sd3_tiny import vae_factor
from samplers.ode import ODESampler

LATENT_CHANNELS = 16
FULL_VAE_FACTOR = 8


@WORLDS.register("sd3")
class SD3World(World):
    """SD3Transformer2DModel + LoRA policy; frozen VAE and text encoders; rewards from the reward registry.

    `variant: tiny` swaps every component for a tiny random one (32 px, float32, offline tokenizers) so the same
    code runs on a CPU; it ignores model_path, resolution, dtype and max_sequence_length, and uses one CPU thread
    unless world.threads says otherwise. `world.tiny` resizes the tiny parts (sd3_tiny.tiny_spec: transformer,
    clip, words, resolution, `vae: identity` for a pixel-space flow); the shapes world is built that way.
    `variant: random_full` is SD3.5-Medium's transformer and VAE from their published configs with random weights
    and small text-encoder stand-ins of SD3.5's embedding widths (bench/worlds/sd3_random_full.py): it honours
    resolution, the dtypes and max_sequence_length, downloads nothing, and times an SD3.5-M iteration anywhere.
    """

    _DTYPES = ("float32", "bfloat16", "float16")
    OPTIONS = {
        "variant": Option("full", str, choices=VARIANTS,
                          help="full: weights from model_path; tiny: tiny random parts (CPU); random_full: SD3.5-Medium's "
                               "architecture with random weights and small text-encoder stand-ins (timing, no download)"),
        "model_path": Option("stabilityai/stable-diffusion-3.5-medium", str,
                             help="a diffusers folder, or a hub id already in the hub cache"),
        "tiny_seed": Option(0, int, help="tiny variant: seed of the random components"),
        "tiny": Option(None, dict, nullable=True,
                       help="tiny / random_full variants: sizes of their parts (sd3_tiny.tiny_spec)"),
        "dtype": Option("bfloat16", str, choices=_DTYPES, help="transformer weights (LoRA: lora.dtype)"),
        "text_dtype": Option("bfloat16", str, choices=_DTYPES),
        "vae_dtype": Option("float32", str, choices=_DTYPES),
        "t5": Option(True, bool, help="false: zeros in T5's slot"),
        "max_sequence_length": Option(256, int, low=1, help="T5 tokens"),
        "embed_cache_device": Option(None, str, nullable=True),
        "resolution": Option(512, int, low=16, help="pixels"),
        "shift": Option(3.0, float, low=0, low_open=True, help="SD3's timestep shift"),
        "gradient_checkpointing": Option(False, bool),
        "decode_batch": Option(8, int, low=1),
        "lora": Option({}, dict, fields={
            "r": Option(32, int, low=1), "alpha": Option(64.0, float, low=0, low_open=True),
            "targets": Option(None, list, nullable=True, item=Option("", str),
                              help="module names or a named set; null: the default set"),
            "dtype": Option("float32", str, choices=_DTYPES), "seed": Option(0, int, nullable=True)}),
        "prompts": Option({}, dict, fields={
            "train": Option("simple_objects.txt", str, help=".txt or .jsonl under experiments/prompts/ or a path"),
            "eval": Option(None, str, nullable=True),
            "eval_fraction": Option(0.1, float, low=0, high=1, high_open=True),
            "split_seed": Option(0, int), "eval_max": Option(64, int, low=1)}),
        "reward": Option("jpeg", object, valid="a reward name or {name: weight}"),
        "eval": Option({}, dict, fields={
            "num_prompts": Option(16, int, low=1), "samples_per_prompt": Option(2, int, low=1),
            "steps": Option(20, int, low=1), "guidance": Option(4.5, float, low=0),
            "noise_seed": Option(1234, int), "batch_size": Option(8, int, low=1), "grid_max": Option(16, int, low=1),
            "reward": Option(None, object, nullable=True, valid="null or a reward spec")}),
    }
    CPU_OVERRIDES = ("world.variant=tiny",)  # what the registry contract test needs to build it on a CPU
    name = "sd3"

    def __init__(self, cfg, cache_dir):
        cfg = dict(cfg)
        if str(cfg.get("variant")) == "tiny" and cfg.get("threads") is None:
            # Tiny models are overhead-bound: extra intra-op threads only spin (15x slower on 2 busy cores).
            cfg["threads"] = 1
        super().__init__(cfg, cache_dir)
        self.variant = str(self.cfg.get("variant", "full"))
        latent_channels = LATENT_CHANNELS
        spec = variant_spec(self.cfg)  # random weights (tiny, random_full): the parts' sizes; full: None
        if spec is not None:
            if self.variant == "tiny":
                for key in ("dtype", "text_dtype", "vae_dtype"):
                    self.cfg[key] = "float32"
                self.cfg["resolution"] = spec["resolution"]
                self.cfg["max_sequence_length"] = spec["max_sequence_length"]
            factor = vae_factor(spec)
            latent_channels = int(spec["transformer"]["in_channels"])
        else:
            factor = FULL_VAE_FACTOR
        self.resolution = int(self.cfg.get("resolution", 512))
        if self.resolution % (factor * 2):
            raise UserError(f"world.resolution={self.resolution} must be a multiple of {factor * 2} "
                            "(VAE factor x transformer patch size)")
        self.latent_shape = (latent_channels, self.resolution // factor, self.resolution // factor)
        self.shift = float(self.cfg.get("shift", 3.0))
        self._comps: dict[str, Any] | None = None
        self._encoder: SD3PromptEncoder | None = None
        self._prompts: tuple[PromptSet, PromptSet] | None = None
        self._eval_reward: WeightedReward | None = None

    @staticmethod
    def preflight(cfg: dict[str, Any]) -> None:
        """Before any cell runs: the full variant's weights must be found locally (UserError saying what to give)."""
        if str(cfg.get("variant", "full")) == "full":
            resolve_model_path(cfg.get("model_path"))
        train_eval_split(cfg.get("prompts") or {})  # the prompt files exist and hold prompts

    # -- components ------------------------------------------------------------------------
    @property
    def comps(self) -> dict[str, Any]:
        """Frozen components (VAE, text encoders, tokenizers, scheduler), loaded once per world."""
        if self._comps is None:
            self._comps = load_components(self.cfg, self.device, with_transformer=False)
        return self._comps

    @property
    def encoder(self) -> SD3PromptEncoder:
        """The text encoders behind a per-prompt embedding cache."""
        if self._encoder is None:
            jad = None
            if not bool(self.cfg.get("t5", True)):  # the zero T5 slot needs the transformer's text width
                spec = variant_spec(self.cfg)
                jad = (spec["transformer"]["joint_attention_dim"] if spec is not None
                       else int(load_transformer_config(self.cfg)["joint_attention_dim"]))
            self._encoder = SD3PromptEncoder(self.comps, self.device, int(self.cfg.get("max_sequence_length", 256)),
                                             joint_attention_dim=jad, cache_device=self.cfg.get("embed_cache_device"))
        return self._encoder

    def build_policy(self) -> SD3Policy:
        """A fresh base transformer with a new LoRA adapter (B = 0): trainable parameters are LoRA only."""
        transformer = self.load_base_transformer()
        lora = dict(self.cfg.get("lora") or {})
        add_lora(transformer, r=int(lora.get("r", 32)), alpha=float(lora.get("alpha", 64)),
                 targets=list(lora.get("targets") or DEFAULT_TARGETS),
                 dtype=parse_dtype(lora.get("dtype", "float32"), "world.lora.dtype"), seed=lora.get("seed"))
        transformer.to(self.device)
        policy = SD3Policy(transformer, self.encode([""]), self.comps["scheduler"].config.num_train_timesteps,
                           gradient_checkpointing=bool(self.cfg.get("gradient_checkpointing", False)))
        # Eval mode throughout (training included): the transformer has no dropout, and a deterministic policy is
        # what makes the old/new ratio exactly 1 before an update.
        return policy.eval()

    def load_base_transformer(self) -> Any:
        """The base transformer before LoRA (a subclass may load pretrained tiny weights here)."""
        return load_transformer(self.cfg)

    # -- prompts ---------------------------------------------------------------------------
    @property
    def prompt_sets(self) -> tuple[PromptSet, PromptSet]:
        """(train, eval) prompt sets from world.prompts."""
        if self._prompts is None:
            self._prompts = train_eval_split(self.cfg.get("prompts") or {})
        return self._prompts

    def train_prompts(self) -> list[str]:
        """The training prompts (sampled with replacement each iteration)."""
        return self.prompt_sets[0].prompts

    def eval_prompts(self) -> list[str]:
        """The first world.eval.num_prompts held-out prompts."""
        n = int(dict(self.cfg.get("eval") or {}).get("num_prompts", 16))
        return self.prompt_sets[1].prompts[:n]

    def prompt_metadata(self, prompt: str) -> dict[str, Any]:
        """Metadata of a prompt from its JSONL line (e.g. GenEval's tag/include/exclude); {} if none."""
        train, evals = self.prompt_sets
        return evals.metadata.get(prompt) or train.metadata.get(prompt) or {}

    def all_metadata(self) -> list[dict[str, Any]]:
        """Metadata of every prompt (rewards check up front what they will need, e.g. GenEval colours)."""
        train, evals = self.prompt_sets
        return list(train.metadata.values()) + list(evals.metadata.values())

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """{"prompt_embeds", "pooled_prompt_embeds"} for these prompts, each prompt encoded once per world."""
        return self.encoder(prompts)

    # -- images and rewards ----------------------------------------------------------------
    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents -> RGB in [0, 1] (SD3's VAE scaling and shift), in chunks of world.decode_batch."""
        vae = self.comps["vae"]
        sf, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
        out = []
        for chunk in x0.split(int(self.cfg.get("decode_batch", 8))):
            z = chunk.to(device=self.device, dtype=vae.dtype) / sf + shift
            out.append((vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)

    @property
    def eval_reward_fn(self) -> WeightedReward:
        """world.eval.reward if given, else the training reward."""
        spec = dict(self.cfg.get("eval") or {}).get("reward")
        if spec is None:
            return self.reward_fn
        if self._eval_reward is None:
            self._eval_reward = WeightedReward(spec, self, self.cfg.get("reward_options"))
        return self._eval_reward

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def eval_samples(self, model: PolicyCall, prompts: list[str]) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """world.eval.samples_per_prompt ODE samples per prompt on fixed noise, in batches: (images, their prompts)."""
        for _, images, leaf_prompts in self.eval_batches(model, prompts):
            yield images, leaf_prompts

    @torch.no_grad()
    def eval_batches(self, model: PolicyCall, prompts: list[str], shard: tuple[int, int] = (0, 1)
                     ) -> Iterator[tuple[int, torch.Tensor, list[str]]]:
        """(batch index, images, their prompts) of the eval batches; `shard=(r, n)`: only batches b with b % n == r.
        The other batches' noise is still drawn (a zero-velocity pass of the sampler, no model call), so every batch
        gets the noise it gets in one process and a sharded eval scores the same samples."""
        ecfg = dict(self.cfg.get("eval") or {})
        per = int(ecfg.get("samples_per_prompt", 2))
        guidance = float(ecfg.get("guidance", 1.0))
        sampler = ODESampler({"steps": int(ecfg.get("steps", 10)), "shift": self.shift, "guidance": guidance})
        call = PolicyCall(model.policy, model.meter, guidance=guidance, params=model.params,
                          detach_uncond=model.detach_uncond)
        skip_meter = ComputeMeter()
        skip = PolicyCall(_ZeroVelocity(model.policy), skip_meter, guidance=guidance)
        gen = torch.Generator().manual_seed(int(ecfg.get("noise_seed", 1234)))
        bs = max(1, int(ecfg.get("batch_size", 8)) // per)
        rank, ranks = shard
        for b, i in enumerate(range(0, len(prompts), bs)):
            chunk = prompts[i:i + bs]
            if b % ranks != rank:
                with skip_meter.phase("eval"):
                    sampler.sample(skip, chunk, self.encode(chunk), per, self.latent_shape, gen)
                continue
            rollout = sampler.sample(call, chunk, self.encode(chunk), per, self.latent_shape, gen)
            yield b, self.decode(rollout.x0), [chunk[s] for s in rollout.leaf_slot.tolist()]

    @torch.no_grad()
    def evaluate(self, model: PolicyCall, out_dir: Path | None, tag: str, shard: tuple[int, int] = (0, 1),
                 gather: Callable[[Any], list[Any]] | None = None) -> dict[str, float]:
        """ODE samples on fixed noise for the eval prompts; eval_reward (+ one eval_reward_<name> per reward part).

        Data-parallel (bench.runner.distributed.RankWorld): each rank samples and scores its `shard` of the batches
        and `gather` (an all-gather of Python objects) brings every rank's scores, and the sheet's first images, to
        all ranks; the figures are then the one-process figures (same samples, same order of the means)."""
        ecfg = dict(self.cfg.get("eval") or {})
        per = int(ecfg.get("samples_per_prompt", 2))
        grid_max = int(ecfg.get("grid_max", 16))
        records = []
        for b, imgs, leaf_prompts in self.eval_batches(model, self.eval_prompts(), shard):
            model.meter.count_reward(len(leaf_prompts))
            total, part = self.eval_reward_fn(imgs, leaf_prompts)
            start = b * max(1, int(ecfg.get("batch_size", 8)) // per) * per  # the batch's first sample overall
            records.append((b, total.float().cpu(), {k: v.float().cpu() for k, v in part.items()},
                            imgs[:max(0, grid_max - start)].cpu()))
        if gather is not None:
            records = sorted((r for rank_records in gather(records) for r in rank_records), key=lambda r: r[0])
        totals = [r[1] for r in records]
        metrics = {"eval_reward": torch.cat(totals).mean().item()}
        names = list(records[0][2]) if records else []
        if len(names) > 1:
            metrics.update({f"eval_reward_{k}": torch.cat([r[2][k] for r in records]).mean().item() for k in names})
        if out_dir is not None:
            save_image_grid(torch.cat([r[3] for r in records])[:grid_max], Path(out_dir) / f"eval_{tag}.png", cols=per)
        return metrics


class _ZeroVelocity(Policy):
    """A stand-in with the policy's family and zero velocities: runs a sampler for its random draws alone."""

    def __init__(self, policy: Policy):
        super().__init__()
        self.family = policy.family
        # The sampler reads its device off the policy's parameters.
        self.anchor = torch.nn.Parameter(torch.zeros(0, device=next(policy.parameters()).device), requires_grad=False)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Zeros shaped like x."""
        return torch.zeros_like(x)

    def null_cond(self, cond: Any) -> Any:
        """The condition itself (the velocity ignores it)."""
        return cond


def save_image_grid(images: torch.Tensor, path: Path, cols: int = 4) -> None:
    """[N, 3, H, W] in [0, 1] -> one PNG, `cols` per row (one eval prompt's samples side by side)."""
    n, c, h, w = images.shape
    cols = max(1, min(cols, n))
    if cols == 1:
        cols = min(n, 8)
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 128, dtype=np.uint8)
    arr = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if c == 1:
        arr = arr.repeat(3, axis=3)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = arr[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(canvas, "RGB")
    if h < 128:  # tiny-variant samples are 32 px: scale up so the grid is viewable
        img = img.resize((img.width * 4, img.height * 4), Image.NEAREST)
    img.save(path)
