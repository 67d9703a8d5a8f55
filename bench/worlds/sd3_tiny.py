"""Tiny random-weight SD3 components and offline tokenizers, so the sd3 code path runs on a CPU in seconds.

Every component has the class the real SD3.5 checkpoint uses (SD3Transformer2DModel with dual attention and
RMS qk-norm as in SD3.5, AutoencoderKL with 16 latent channels, two CLIPTextModelWithProjection, T5EncoderModel,
FlowMatchEulerDiscreteScheduler with shift 3), only small; tokenizers are built in memory from a fixed vocabulary.
"""
from __future__ import annotations

import copy
import re
from types import SimpleNamespace
from typing import Any, Iterable, Mapping

import torch
from torch import nn

# Words the tiny tokenizers know as single tokens; anything else falls back to characters (CLIP) or <unk> pieces (T5).
TINY_WORDS = (
    "a an the of and on in with to at by photo picture painting drawing image left right above below near "
    "one two three four five six seven eight nine ten red green blue yellow black white brown orange purple pink "
    "gray cat dog bird horse sheep cow elephant bear zebra giraffe apple banana orange pizza cake car bus train "
    "boat bicycle chair couch bed table clock vase book cup bottle tree flower house mountain lake sky sunset "
    "city street beach forest snow small big tiny cute old new wooden glass metal sitting standing running "
    "umbrella bench field cats dogs birds apples chairs cups"
).split()

TINY = {
    "resolution": 32,          # pixels; latents are 16 x 16 x 16
    "clip_max_length": 16,
    "max_sequence_length": 16,  # T5 tokens
    "vae": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                latent_channels=16, norm_num_groups=4, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False),
    "transformer": dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                        pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16,
                        dual_attention_layers=(0,), qk_norm="rms_norm"),
    "clip": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 projection_dim=16, max_position_embeddings=16, hidden_act="gelu", layer_norm_eps=1e-5),
    "t5": dict(d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8,
               relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0,
               is_encoder_decoder=False, use_cache=False),
}


def tiny_spec(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """TINY with `overrides` merged one level deep (e.g. {"transformer": {...}, "vae": "identity", "words": [...]})."""
    spec = copy.deepcopy(TINY)
    for k, v in dict(overrides or {}).items():
        spec[k] = {**spec[k], **v} if isinstance(spec.get(k), dict) and isinstance(v, Mapping) else v
    return spec


def vae_factor(spec: Mapping[str, Any]) -> int:
    """Pixels per latent cell: 1 for the identity (pixel-space) VAE, 2^(blocks - 1) for AutoencoderKL."""
    return 1 if spec["vae"] == "identity" else 2 ** (len(spec["vae"]["block_out_channels"]) - 1)


class PixelVAE(nn.Module):
    """The identity VAE of a pixel-space flow: latents are the RGB image in [-1, 1] (scaling 1, shift 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0, shift_factor=0.0, latent_channels=3)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # carries dtype and device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype latents are cast to before decoding (as AutoencoderKL.dtype)."""
        return self._anchor.dtype

    def decode(self, z: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        """Latents are images: returned as they are (AutoencoderKL.decode's tuple form)."""
        return (z,)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_clip_tokenizer(words: Iterable[str] = TINY_WORDS, max_length: int = TINY["clip_max_length"]) -> Any:
    """A byte-level BPE CLIPTokenizer over the 256 byte symbols plus merges that make `words` single tokens."""
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for sym in alphabet + [s + "</w>" for s in alphabet]:
        vocab.setdefault(sym, len(vocab))
    merges: list[tuple[str, str]] = []
    seen = set()
    # Longer words first: BPE applies the lowest-ranked merge, so a short word's merge ("a", "t</w>") must not
    # outrank a longer word's prefix merge ("c", "a") or "cat" would split into "c" + "at".
    for w in sorted({re.sub(r"[^a-z]", "", w.lower()) for w in words}, key=lambda w: (-len(w), w)):
        if len(w) < 2:
            continue
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        acc = pieces[0]
        for p in pieces[1:]:
            if (acc, p) not in seen:
                seen.add((acc, p))
                merges.append((acc, p))
            acc += p
            vocab.setdefault(acc, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_t5_tokenizer(words: Iterable[str] = TINY_WORDS, max_length: int = TINY["max_sequence_length"]) -> Any:
    """A Unigram T5Tokenizer: whole words score higher than single characters, so known words are one piece."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    for w in words:
        if "\u2581" + w not in seen:
            seen.add("\u2581" + w)
            pieces.append(("\u2581" + w, -1.0))
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-":
        for piece in (ch, "\u2581" + ch):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -6.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_encoder(tokenizer: Any, seed: int, clip: Mapping[str, Any] = TINY["clip"]) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **clip)
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(cfg)


def build_tiny_components(seed: int = 0, overrides: Mapping[str, Any] | None = None,
                          with_transformer: bool = True) -> dict[str, Any]:
    """Every StableDiffusion3Pipeline component, tiny and random but deterministic in `seed` (global RNG untouched).

    `overrides` (see tiny_spec) resize the parts; `vae: identity` gives a pixel-space flow (PixelVAE), `words` the
    tokenizers' whole-word vocabulary, `clip_2` the second CLIP encoder (default: as `clip`).
    `with_transformer=False` leaves the transformer out (None): the policy builds its own.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel

    spec = tiny_spec(overrides)
    words = spec.get("words") or TINY_WORDS
    with torch.random.fork_rng(devices=[]):
        tok = tiny_clip_tokenizer(words, spec["clip_max_length"])
        tok2 = tiny_clip_tokenizer(words, spec["clip_max_length"])
        tok3 = tiny_t5_tokenizer(words, max(1, spec["max_sequence_length"]))
        comps = {
            "tokenizer": tok, "tokenizer_2": tok2, "tokenizer_3": tok3,
            "text_encoder": _clip_encoder(tok, seed + 1, spec["clip"]),
            "text_encoder_2": _clip_encoder(tok2, seed + 2, spec.get("clip_2") or spec["clip"]),
        }
        torch.manual_seed(seed + 3)
        comps["text_encoder_3"] = T5EncoderModel(T5Config(vocab_size=len(tok3), pad_token_id=tok3.pad_token_id,
                                                          eos_token_id=tok3.eos_token_id, **spec["t5"]))
        torch.manual_seed(seed + 4)
        comps["vae"] = PixelVAE() if spec["vae"] == "identity" else AutoencoderKL(**spec["vae"])
        comps["transformer"] = build_tiny_transformer(seed, overrides) if with_transformer else None
    comps["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=float(spec.get("shift", 3.0)))
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        comps[name].eval().requires_grad_(False)
    return comps


def build_tiny_transformer(seed: int = 0, overrides: Mapping[str, Any] | None = None) -> Any:
    """The tiny SD3Transformer2DModel alone (a fresh policy per cell without rebuilding the text encoders)."""
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 5)
        model = SD3Transformer2DModel(**tiny_spec(overrides)["transformer"])
    return model.eval()


def tiny_world_config(**overrides: Any) -> dict[str, Any]:
    """A complete `world` config for SD3World(variant=tiny) without Hydra (tests, benchmarks)."""
    cfg: dict[str, Any] = {
        "name": "sd3", "variant": "tiny", "device": "cpu", "shift": 3.0, "t5": True, "decode_batch": 8,
        "lora": {"r": 4, "alpha": 8, "targets": ["to_q", "to_k", "to_v", "to_out.0"], "seed": 0},
        "prompts": {"train": "simple_objects.txt", "eval_fraction": 0.1, "eval_max": 4},
        "reward": "jpeg", "reward_options": {},
        "eval": {"num_prompts": 2, "samples_per_prompt": 2, "steps": 4, "guidance": 2.0, "batch_size": 4},
    }
    for k, v in overrides.items():
        cfg[k] = {**cfg[k], **v} if isinstance(cfg.get(k), dict) and isinstance(v, dict) else v
    return cfg
