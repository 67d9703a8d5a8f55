"""Loading SD3 components (real from a diffusers folder or the hub cache, or tiny random ones) with clear errors."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from bench.core.errors import UserError
from bench.worlds.sd3_random_full import random_full_spec
from bench.worlds.sd3_tiny import build_tiny_components, build_tiny_transformer, tiny_spec

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
              "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")
FROZEN = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
EXAMPLE_HUB_ID = "stabilityai/stable-diffusion-3.5-medium"


VARIANTS = ("full", "tiny", "random_full")


def variant_spec(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """The sd3_tiny spec of a random-weight variant (tiny: world.tiny over sd3_tiny.TINY; random_full: SD3.5-Medium's
    shapes at world.resolution, world.tiny over them), or None for `full` (weights from world.model_path)."""
    variant = str(cfg.get("variant", "full"))
    if variant == "tiny":
        return tiny_spec(cfg.get("tiny"))
    if variant == "random_full":
        return random_full_spec(int(cfg.get("resolution", 512)), int(cfg.get("max_sequence_length", 256)),
                                cfg.get("tiny"))
    if variant != "full":
        raise UserError(f"world.variant={variant!r}; valid: {', '.join(VARIANTS)}")
    return None


def parse_dtype(value: Any, key: str) -> torch.dtype:
    """'bfloat16' / 'bf16' / 'float16' / 'fp16' / 'float32' -> torch dtype, with a one-line error otherwise."""
    if isinstance(value, torch.dtype):
        return value
    if str(value) not in DTYPES:
        raise UserError(f"{key}={value!r} is not a dtype; valid: {', '.join(sorted(DTYPES))}")
    return DTYPES[str(value)]


def hf_dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers' from_pretrained dtype keyword: `dtype` from 5.0 on, `torch_dtype` before."""
    import transformers

    return {"dtype": dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}


def missing_model_message(model_path: Any, detail: str = "") -> str:
    """What to provide when SD3 weights cannot be found (shared by the world and the reward loaders' style)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    why = "no local copy was found" + (" and HF_HUB_OFFLINE=1 forbids downloading" if offline else "")
    return (f"world.model_path={model_path!r}: {why}{'; ' + detail if detail else ''}. Give world.model_path=/path/to/"
            f"stable-diffusion-3.5-medium (a diffusers folder with model_index.json and {', '.join(SUBFOLDERS)}/), or "
            f"a hub id already in the hub cache (download it once with `hf download {EXAMPLE_HUB_ID}`; the model is "
            "gated: accept its licence on huggingface.co and `hf auth login` first), "
            "or use world.variant=tiny for random tiny weights")


def resolve_model_path(model_path: Any) -> str:
    """A local diffusers folder, or a hub id whose snapshot is in the local hub cache (never downloads when offline)."""
    if model_path in (None, "", "null"):
        raise UserError(missing_model_message(model_path, "world.model_path is not set"))
    p = Path(str(model_path)).expanduser()
    if p.exists():
        if not (p / "model_index.json").exists() and not (p / "transformer").is_dir():
            raise UserError(missing_model_message(model_path, f"{p} exists but is not a diffusers SD3 folder"))
        return str(p)
    if str(model_path).startswith((".", "/", "~")) or str(model_path).count("/") != 1:
        raise UserError(missing_model_message(model_path, f"{p} does not exist"))
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(str(model_path), local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError, HFValidationError, ...
        if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False"):
            try:
                return snapshot_download(str(model_path))
            except Exception as e2:
                raise UserError(missing_model_message(model_path, f"download failed: {type(e2).__name__}")) from e2
        raise UserError(missing_model_message(model_path)) from e


def load_pretrained(cls: Any, root: str, subfolder: str, model_path: Any, **kwargs: Any) -> Any:
    """cls.from_pretrained(root, subfolder=...) with a one-line error naming the missing part."""
    if not (Path(root) / subfolder).exists():
        raise UserError(missing_model_message(model_path, f"{Path(root) / subfolder} is missing"))
    try:
        return cls.from_pretrained(root, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(missing_model_message(model_path, f"{subfolder}: {str(e).splitlines()[0]}")) from e


def load_components(cfg: Mapping[str, Any], device: torch.device, with_transformer: bool = True) -> dict[str, Any]:
    """Every StableDiffusion3Pipeline component, frozen (eval mode, no grad) except the transformer."""
    text_dtype = parse_dtype(cfg.get("text_dtype", cfg.get("dtype", "bfloat16")), "world.text_dtype")
    vae_dtype = parse_dtype(cfg.get("vae_dtype", "float32"), "world.vae_dtype")
    spec = variant_spec(cfg)
    if spec is not None:
        comps = build_tiny_components(int(cfg.get("tiny_seed", 0)), spec, with_transformer=with_transformer)
    else:
        comps = _load_full(cfg, text_dtype, vae_dtype, with_transformer)
    if not bool(cfg.get("t5", True)):
        # SD3 runs without T5 (zero embeddings in its slot): saves ~9 GB at some prompt-following cost.
        comps["text_encoder_3"], comps["tokenizer_3"] = None, None
    for name in FROZEN:
        m = comps.get(name)
        if m is not None:
            m.requires_grad_(False).eval()
            want = vae_dtype if name == "vae" else text_dtype
            # Cast only when needed: diffusers warns on every dtype .to(), even a no-op one.
            m.to(device) if m.dtype == want else m.to(device=device, dtype=want)
    return comps


def _load_full(cfg: Mapping[str, Any], text_dtype: torch.dtype, vae_dtype: torch.dtype,
               with_transformer: bool) -> dict[str, Any]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    model_path = cfg.get("model_path")
    root = resolve_model_path(model_path)
    comps: dict[str, Any] = {
        "scheduler": load_pretrained(FlowMatchEulerDiscreteScheduler, root, "scheduler", model_path),
        "tokenizer": load_pretrained(CLIPTokenizer, root, "tokenizer", model_path),
        "tokenizer_2": load_pretrained(CLIPTokenizer, root, "tokenizer_2", model_path),
        "text_encoder": load_pretrained(CLIPTextModelWithProjection, root, "text_encoder", model_path,
                                        **hf_dtype_kwargs(text_dtype)),
        "text_encoder_2": load_pretrained(CLIPTextModelWithProjection, root, "text_encoder_2", model_path,
                                          **hf_dtype_kwargs(text_dtype)),
        "vae": load_pretrained(AutoencoderKL, root, "vae", model_path, torch_dtype=vae_dtype),
        "tokenizer_3": None, "text_encoder_3": None, "transformer": None,
    }
    if bool(cfg.get("t5", True)):
        comps["tokenizer_3"] = load_pretrained(T5TokenizerFast, root, "tokenizer_3", model_path)
        comps["text_encoder_3"] = load_pretrained(T5EncoderModel, root, "text_encoder_3", model_path,
                                                  **hf_dtype_kwargs(text_dtype))
    if with_transformer:
        comps["transformer"] = load_transformer(cfg)
    return comps


def load_transformer(cfg: Mapping[str, Any]) -> Any:
    """A fresh SD3Transformer2DModel (base weights, no adapter) in world.dtype."""
    dtype = parse_dtype(cfg.get("dtype", "bfloat16"), "world.dtype")
    spec = variant_spec(cfg)
    if spec is not None:
        model = build_tiny_transformer(int(cfg.get("tiny_seed", 0)), spec)
        return model if model.dtype == dtype else model.to(dtype)
    from diffusers import SD3Transformer2DModel

    model_path = cfg.get("model_path")
    return load_pretrained(SD3Transformer2DModel, resolve_model_path(model_path), "transformer", model_path,
                           torch_dtype=dtype).eval()


def load_transformer_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The transformer's config.json (no weights loaded)."""
    from diffusers import SD3Transformer2DModel

    model_path = cfg.get("model_path")
    root = resolve_model_path(model_path)
    if not (Path(root) / "transformer").exists():
        raise UserError(missing_model_message(model_path, f"{Path(root) / 'transformer'} is missing"))
    return dict(SD3Transformer2DModel.load_config(root, subfolder="transformer"))
