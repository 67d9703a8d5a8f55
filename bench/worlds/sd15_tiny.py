"""Tiny random-weight Stable Diffusion 1.5 components, so the sd15 code path runs on a CPU in seconds.

Every component has the class SD1.5 uses (UNet2DConditionModel with cross-attention blocks, AutoencoderKL with 4
latent channels and scaling 0.18215, CLIPTextModel, DDIMScheduler with SD1.5's scheduler config), only small; the
tokenizer is the sd3 world's offline byte-level CLIP tokenizer (bench.worlds.sd3_tiny).
"""
from __future__ import annotations

from typing import Any

import torch

from bench.worlds.sd3_tiny import TINY, tiny_clip_tokenizer

# runwayml/stable-diffusion-v1-5's scheduler_config.json keys that DDIMScheduler reads (DDPO swaps in DDIM with
# DDIMScheduler.from_config of it).
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")

TINY15 = {
    "resolution": 32,          # pixels; latents are 4 x 8 x 8 (a 3-block VAE: factor 4)
    "clip_max_length": TINY["clip_max_length"],
    "unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
                 norm_num_groups=4),
    "vae": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 16), layers_per_block=1,
                latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.18215),
    "clip": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=TINY["clip_max_length"], hidden_act="quick_gelu", layer_norm_eps=1e-5),
}


def build_tiny_sd15_components(seed: int = 0) -> dict[str, Any]:
    """StableDiffusionPipeline's components (UNet excluded), tiny and random, deterministic in `seed`, frozen."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        tok = tiny_clip_tokenizer(max_length=TINY15["clip_max_length"])
        torch.manual_seed(seed + 1)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                            **TINY15["clip"]))
        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(**TINY15["vae"])
    for m in (text, vae):
        m.eval().requires_grad_(False)
    return {"tokenizer": tok, "text_encoder": text, "vae": vae, "scheduler": DDIMScheduler(**SD15_SCHEDULER)}


def build_tiny_unet(seed: int = 0) -> Any:
    """The tiny UNet2DConditionModel alone (a fresh policy per cell without rebuilding the text encoder)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        unet = UNet2DConditionModel(**TINY15["unet"])
    return unet.eval()
