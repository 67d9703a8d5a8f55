"""The sd15 world: Stable Diffusion 1.5 (DDPO's model) with LoRA, DDIM rollouts, prompt files and reward models."""
from __future__ import annotations

from typing import Any

from bench.core.schema import Option
from bench.worlds import WORLDS
from bench.worlds.base import World
from bench.worlds.sd15_policy import SD15Policy, SD15PromptEncoder, scheduler_family
from bench.worlds.sd15_tiny import TINY15, build_tiny_sd15_components, build_tiny_unet
from bench.worlds.sd3 import SD3World
from bench.worlds.sd3_components import load_pretrained, parse_dtype, resolve_model_path
from bench.worlds.sd3_policy import add_lora

LATENT_CHANNELS = 4
FULL_VAE_FACTOR = 8
DDPO_MODEL = "runwayml/stable-diffusion-v1-5"  # ddpo-pytorch config/base.py pretrained.model


@WORLDS.register("sd15")
class SD15World(SD3World):
    """UNet2DConditionModel + LoRA policy (epsilon prediction, a VP family from the DDIMScheduler); frozen CLIP text
    encoder and VAE. Prompts, decoding, rewards and evaluation are the sd3 world's; evaluation runs deterministic
    DDIM (the ODE sampler on a VP model) with CFG. `variant: tiny` builds every part small and random
    (bench.worlds.sd15_tiny, 32 px, float32, offline tokenizer, an eval of at most 4 prompts and 10 steps). The sd3
    options t5, max_sequence_length and tiny do not apply here.
    """

    OPTIONS = {
        "model_path": Option(DDPO_MODEL, str, help="an SD1.5 diffusers folder, or a hub id already in the hub cache"),
        "dtype": Option("float16", str, choices=SD3World._DTYPES, help="UNet weights (ddpo-pytorch: fp16; LoRA: lora.dtype)"),
        "text_dtype": Option("float16", str, choices=SD3World._DTYPES),
        "shift": Option(1.0, float, low=1.0, high=1.0, help="flow time shift: not used by VP models"),
        "sde_kernel": Option("ddim", str, choices=("ddim",),
                             help="the SDE kernel tree and mix samplers default to here (experiments/sampler/)"),
    }
    CPU_OVERRIDES = ("world.variant=tiny",)  # what the registry contract test needs to build it on a CPU
    name = "sd15"
    family_name = "vp"

    def __init__(self, cfg, cache_dir):
        cfg = dict(cfg)
        if str(cfg.get("variant")) == "tiny" and cfg.get("threads") is None:
            cfg["threads"] = 1  # tiny models are overhead-bound (see SD3World)
        # World's own set-up only: SD3World.__init__ sizes SD3's transformer latents.
        World.__init__(self, cfg, cache_dir)
        self.variant = str(self.cfg["variant"])
        if self.variant == "tiny":
            for key in ("dtype", "text_dtype", "vae_dtype"):
                self.cfg[key] = "float32"
            self.cfg["resolution"] = TINY15["resolution"]
            # A CPU-sized eval (tests, smoke grids): at most 4 prompts and 10 DDIM steps.
            ecfg = self.cfg["eval"]
            ecfg["num_prompts"], ecfg["steps"] = min(int(ecfg["num_prompts"]), 4), min(int(ecfg["steps"]), 10)
            factor = 2 ** (len(TINY15["vae"]["block_out_channels"]) - 1)
        else:
            factor = FULL_VAE_FACTOR
        self.resolution = int(self.cfg["resolution"])
        if self.resolution % (factor * 2):
            raise ValueError(f"world.resolution={self.resolution} must be a multiple of {factor * 2}")
        self.latent_shape = (LATENT_CHANNELS, self.resolution // factor, self.resolution // factor)
        self.shift = 1.0
        self._comps, self._encoder, self._prompts, self._eval_reward = None, None, None, None

    # -- components ------------------------------------------------------------------------
    @property
    def comps(self) -> dict[str, Any]:
        """Frozen tokenizer, text encoder, VAE, and the DDIMScheduler (DDPO: DDIMScheduler.from_config)."""
        if self._comps is None:
            if self.variant == "tiny":
                comps = build_tiny_sd15_components(int(self.cfg["tiny_seed"]))
            else:
                comps = _load_full(self.cfg)
            for name in ("text_encoder", "vae"):
                want = parse_dtype(self.cfg["vae_dtype" if name == "vae" else "text_dtype"], f"world.{name}")
                comps[name].requires_grad_(False).eval().to(device=self.device, dtype=want)
            self._comps = comps
        return self._comps

    @property
    def encoder(self) -> SD15PromptEncoder:
        if self._encoder is None:
            self._encoder = SD15PromptEncoder(self.comps, self.device, self.cfg.get("embed_cache_device"))
        return self._encoder

    def load_base_transformer(self) -> Any:
        """The base UNet before LoRA, in world.dtype."""
        dtype = parse_dtype(self.cfg["dtype"], "world.dtype")
        if self.variant == "tiny":
            return build_tiny_unet(int(self.cfg["tiny_seed"])).to(dtype)
        from diffusers import UNet2DConditionModel

        root = resolve_model_path(self.cfg["model_path"])
        return load_pretrained(UNet2DConditionModel, root, "unet", self.cfg["model_path"], torch_dtype=dtype).eval()

    def build_policy(self) -> SD15Policy:
        """A fresh base UNet with a new LoRA adapter (B = 0): trainable parameters are LoRA only."""
        unet = self.load_base_transformer()
        lora = dict(self.cfg["lora"])
        add_lora(unet, r=int(lora["r"]), alpha=float(lora["alpha"]), targets=list(lora["targets"] or ["image_attention"]),
                 dtype=parse_dtype(lora["dtype"], "world.lora.dtype"), seed=lora.get("seed"))
        unet.to(self.device)
        policy = SD15Policy(unet, self.encode([""]), scheduler_family(self.comps["scheduler"]),
                            gradient_checkpointing=bool(self.cfg["gradient_checkpointing"]))
        return policy.eval()


def _load_full(cfg: dict[str, Any]) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    path = cfg["model_path"]
    root = resolve_model_path(path)
    return {"tokenizer": load_pretrained(CLIPTokenizer, root, "tokenizer", path),
            "text_encoder": load_pretrained(CLIPTextModel, root, "text_encoder", path),
            "vae": load_pretrained(AutoencoderKL, root, "vae", path),
            "scheduler": load_pretrained(DDIMScheduler, root, "scheduler", path)}


