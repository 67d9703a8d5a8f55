"""world.variant=random_full (issue 13 item 8): SD3.5-Medium's published transformer config, built with random weights
on the meta device, has the parameter count of the architecture worked out by hand; the text stand-ins give SD3.5's
embedding shapes."""
from __future__ import annotations

import inspect

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel

from bench.worlds.sd3_components import load_components, load_transformer
from bench.worlds.sd3_random_full import published_config
from bench.worlds.sd3_text import SD3PromptEncoder
from bench.worlds.sd3_tiny import tiny_world_config

SD35_MEDIUM_TRANSFORMER_PARAMS = 2_243_171_520


def hand_count(D: int = 1536, layers: int = 24, dual: int = 13, head_dim: int = 64, text: int = 4096,
               pooled: int = 2048, latent: int = 16, patch: int = 2) -> int:
    """SD3Transformer2DModel's parameters from its layer list (diffusers transformer_sd3.py / attention.py
    JointTransformerBlock): AdaLN-Zero (9D with dual attention, else 6D), context AdaLN (the last block: the
    continuous 2D one, no context output or context FF), q/k/v + added q/k/v + outputs, RMS qk-norm weights, a
    second attention in the dual blocks, 4x GELU feed-forwards; patch embed, time/text embedders, caption
    projection, final AdaLN and projection."""
    lin = lambda i, o: i * o + o  # noqa: E731
    ff = lin(D, 4 * D) + lin(4 * D, D)
    total = 0
    for i in range(layers):
        last = i == layers - 1
        total += lin(D, 9 * D) if i < dual else lin(D, 6 * D)
        total += lin(D, 2 * D) if last else lin(D, 6 * D)
        total += 7 * lin(D, D) + (0 if last else lin(D, D)) + 4 * head_dim
        total += (4 * lin(D, D) + 2 * head_dim) if i < dual else 0
        total += ff + (0 if last else ff)
    total += latent * patch * patch * D + D                     # patch embedding conv
    total += lin(256, D) + lin(D, D) + lin(pooled, D) + lin(D, D)  # timestep + pooled-text embedders
    total += lin(text, D) + lin(D, 2 * D) + lin(D, patch * patch * latent)
    return total


def test_published_config_names_are_the_diffusers_arguments() -> None:
    for cls, part in ((SD3Transformer2DModel, "transformer"), (AutoencoderKL, "vae")):
        args = set(inspect.signature(cls.__init__).parameters) - {"self"}
        assert set(published_config(part)) <= args, set(published_config(part)) - args
    t = published_config("transformer")
    assert (t["num_layers"], t["dual_attention_layers"], t["num_attention_heads"] * t["attention_head_dim"]) == \
        (24, tuple(range(13)), 1536)


def test_random_full_transformer_on_meta_has_sd35_medium_parameter_count() -> None:
    cfg = tiny_world_config(variant="random_full", dtype="bfloat16", resolution=512)
    with torch.device("meta"):
        model = load_transformer(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == hand_count() == SD35_MEDIUM_TRANSFORMER_PARAMS
    assert {p.device.type for p in model.parameters()} == {"meta"} and model.dtype == torch.bfloat16
    assert sum(hasattr(b, "attn2") and b.attn2 is not None for b in model.transformer_blocks) == 13


def test_random_full_text_stand_ins_give_sd35_embedding_shapes() -> None:
    small_vae = {"block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4, "layers_per_block": 1}
    cfg = tiny_world_config(variant="random_full", dtype="float32", text_dtype="float32", max_sequence_length=8,
                            tiny={"vae": small_vae})
    comps = load_components(cfg, torch.device("cpu"), with_transformer=False)
    assert comps["transformer"] is None and comps["tokenizer"].model_max_length == 77
    out = SD3PromptEncoder(comps, torch.device("cpu"), 8)(["a red cat", "two dogs"])
    assert out["prompt_embeds"].shape == (2, 77 + 8, 4096)
    assert out["pooled_prompt_embeds"].shape == (2, 768 + 1280)
