"""`world.variant=random_full`: SD3.5-Medium's transformer and VAE from their published configs, random weights.

The architecture is stabilityai/stable-diffusion-3.5-medium's (bench/worlds/configs/sd35_medium/: 24 joint blocks,
dual attention in the first 13, 24 heads x 64 = 1536 hidden, patch 2, 16 latent channels, RMS qk-norm; its
16-channel AutoencoderKL), so an iteration costs what an SD3.5-M iteration costs, with nothing downloaded. The
three text encoders are small random stand-ins with SD3.5's embedding shapes (CLIP-L 768 and CLIP-G 1280 widths,
pooled 768 + 1280 = 2048; T5 width 4096), one layer each: their cost is not SD3.5's (they run once per prompt,
cached), their outputs' shapes are. `world.tiny` resizes any part (e.g. {transformer: {num_layers: 2}}).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

from bench.worlds.sd3_tiny import tiny_spec

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "sd35_medium"

# One-layer encoders whose hidden and projection widths are SD3.5's (CLIP ViT-L/14 text: 768, OpenCLIP bigG: 1280,
# T5-XXL: 4096), so prompt_embeds is [B, 77 + max_sequence_length, 4096] and pooled_prompt_embeds [B, 2048].
STAND_INS: dict[str, dict[str, Any]] = {
    "clip": dict(hidden_size=768, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=2,
                 projection_dim=768, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5),
    "clip_2": dict(hidden_size=1280, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=2,
                   projection_dim=1280, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5),
    "t5": dict(d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=2, relative_attention_num_buckets=32,
               relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
               is_encoder_decoder=False, use_cache=False),
}
CLIP_MAX_LENGTH = 77  # SD3's CLIP tokenizers' model_max_length


def published_config(part: str) -> dict[str, Any]:
    """The published config.json of SD3.5-Medium's `part` ("transformer" or "vae"), without its "_" keys."""
    cfg = json.loads((CONFIG_DIR / f"{part}.json").read_text())
    out = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if "dual_attention_layers" in out:
        out["dual_attention_layers"] = tuple(out["dual_attention_layers"])
    return out


def random_full_spec(resolution: int = 512, max_sequence_length: int = 256,
                     overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A sd3_tiny spec (what build_tiny_components builds) of SD3.5-Medium's shapes at `resolution` pixels, then
    `overrides` merged one level deep as tiny_spec does."""
    spec = tiny_spec({"transformer": published_config("transformer"), "vae": published_config("vae"),
                      **copy.deepcopy(STAND_INS), "resolution": int(resolution),
                      "clip_max_length": CLIP_MAX_LENGTH, "max_sequence_length": int(max_sequence_length)})
    for k, v in dict(overrides or {}).items():
        spec[k] = {**spec[k], **v} if isinstance(spec.get(k), dict) and isinstance(v, Mapping) else v
    return spec
