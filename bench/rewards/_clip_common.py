"""Shared machinery of the CLIP-based rewards: local loading with clear errors, on-device preprocessing, tiny models.

Images arrive as float tensors [B, 3, H, W] in [0, 1] on the training device; preprocessing (resize of the short
side, center crop, normalisation) runs there too, so scoring never round-trips through PIL or the disk.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from bench.core.errors import UserError
from bench.worlds.sd3_components import hf_dtype_kwargs
from bench.worlds.sd3_tiny import tiny_clip_tokenizer

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImagePrep:
    """CLIP-style preprocessing: bicubic resize of the short side to `size`, center crop `crop`, normalise."""

    size: int = 224
    crop: int = 224
    mean: Sequence[float] = OPENAI_MEAN
    std: Sequence[float] = OPENAI_STD

    @classmethod
    def from_processor_config(cls, cfg: Mapping[str, Any]) -> "ImagePrep":
        """From a preprocessor_config.json (transformers CLIPImageProcessor's keys)."""
        size = cfg.get("size", 224)
        if isinstance(size, Mapping):
            size = size.get("shortest_edge") or min(size.get("height", 224), size.get("width", 224))
        crop = cfg.get("crop_size", size)
        if isinstance(crop, Mapping):
            crop = min(crop.get("height", size), crop.get("width", size))
        return cls(int(size), int(crop), tuple(cfg.get("image_mean", OPENAI_MEAN)), tuple(cfg.get("image_std", OPENAI_STD)))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if min(h, w) != self.size:
            # The long side as transformers' get_resize_output_image_size computes it (truncated, not rounded).
            out = (self.size, int(self.size * w / h)) if h <= w else (int(self.size * h / w), self.size)
            x = F.interpolate(x, size=(max(self.crop, out[0]), max(self.crop, out[1])), mode="bicubic",
                              antialias=True, align_corners=False).clamp(0, 1)
        h, w = x.shape[-2:]
        top, left = (h - self.crop) // 2, (w - self.crop) // 2
        x = x[..., top:top + self.crop, left:left + self.crop]
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def reward_device(world: Any) -> torch.device:
    """The training device: rewards score where the images already are."""
    return torch.device(getattr(world, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu"))


def require_path(cfg: Mapping[str, Any], key: str, reward: str, what: str, section: str = "") -> Path:
    """cfg[key] as an existing local path, or a one-line error saying which option to set and to what
    (`section`: the sub-mapping of the reward's options that cfg is, e.g. "detector")."""
    value = cfg.get(key)
    option = f"world.reward_options.{reward}.{section + '.' if section else ''}{key}"
    hint = f"set {option}=/path/to/{what}"
    if value in (None, ""):
        raise UserError(f"reward '{reward}' needs local weights: {hint}")
    p = Path(str(value)).expanduser()
    if not p.exists():
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise UserError(f"reward '{reward}': {option}={value!r} does not exist"
                        f"{' (HF_HUB_OFFLINE=1: nothing is downloaded)' if offline else ''}; {hint}")
    return p


def clip_paths(cfg: Mapping[str, Any], reward: str, what: str) -> tuple[Path, Path] | None:
    """(model_path, processor_path) that load_clip will read, each checked to exist (UserError naming the option);
    None for a tiny random CLIP. Also each CLIP reward's preflight: nothing is loaded."""
    if cfg.get("tiny"):
        return None
    model_path = require_path(cfg, "model_path", reward, what)
    proc_path = require_path(cfg, "processor_path", reward, "its CLIP processor") if cfg.get("processor_path") \
        else model_path
    return model_path, proc_path


# Optional packages that no pip extra can install (they compile against the installed torch): where the steps are.
MANUAL_INSTALLS = {"geneval": "the steps in docs/sd3.md, \"GenEval's detector\" (mmdet 2.x, mmcv-full 1.7.2)"}


def install_hint(extra: str) -> str:
    """How to install an optional extra: its pip command, or where its manual steps are."""
    return MANUAL_INSTALLS.get(extra, f"pip install 'diffrl-bench[{extra}]'")


def require_module(module: str, reward: str, package: str, extra: str = "gpu-rewards") -> None:
    """UserError naming the install command if `module`'s top-level package is not installed (nothing imported:
    a preflight check that optional_import will succeed)."""
    import importlib.util

    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise UserError(f"reward '{reward}' needs the optional package '{package}' (module {module} is not installed); "
                        f"install it with: {install_hint(extra)}")


def _processor_config(path: Path) -> dict[str, Any]:
    f = path / "preprocessor_config.json"
    return json.loads(f.read_text()) if f.exists() else {}


def load_clip(cfg: Mapping[str, Any], reward: str, what: str, dtype: torch.dtype, device: torch.device
              ) -> tuple[Any, Any, ImagePrep]:
    """(CLIPModel, tokenizer, ImagePrep) from world.reward_options.<reward>.model_path (processor_path optional),
    or a tiny random CLIP when `tiny: true` (tests and CPU smoke grids)."""
    from transformers import AutoTokenizer, CLIPModel

    if cfg.get("tiny"):
        model, tok, prep = tiny_clip(int(cfg.get("tiny_seed", 0)))
    else:
        model_path, proc_path = clip_paths(cfg, reward, what)
        try:
            model = CLIPModel.from_pretrained(str(model_path), **hf_dtype_kwargs(dtype))
            tok = AutoTokenizer.from_pretrained(str(proc_path))
        except (OSError, ValueError) as e:
            raise UserError(f"reward '{reward}': cannot load a transformers CLIPModel + tokenizer from "
                            f"'{model_path}' / '{proc_path}': {str(e).splitlines()[0]}") from e
        prep = ImagePrep.from_processor_config(_processor_config(Path(proc_path)))
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, tok, prep


def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projection; 4.x returns the tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clip_text_embeddings(model: Any, tok: Any, prompts: list[str]) -> torch.Tensor:
    """L2-normalised text embeddings in float32."""
    device = next(model.parameters()).device
    t = tok(prompts, padding=True, truncation=True, max_length=min(int(tok.model_max_length), 77),
            return_tensors="pt").to(device)
    out = model.get_text_features(input_ids=t.input_ids, attention_mask=t.attention_mask)
    return F.normalize(_features(out).float(), dim=-1)


@torch.no_grad()
def clip_embeddings(model: Any, tok: Any, prep: ImagePrep, images: torch.Tensor, prompts: list[str] | None,
                    batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor | None]:
    """L2-normalised image (and text) embeddings in float32, computed in chunks on the model's device."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    img, txt = [], []
    for i in range(0, images.shape[0], batch_size):
        px = prep(images[i:i + batch_size].to(device)).to(dtype)
        img.append(F.normalize(_features(model.get_image_features(pixel_values=px)).float(), dim=-1))
        if prompts is not None:
            txt.append(clip_text_embeddings(model, tok, prompts[i:i + batch_size]))
    return torch.cat(img), (torch.cat(txt) if prompts is not None else None)


def tiny_clip(seed: int = 0, image_size: int = 32) -> tuple[Any, Any, ImagePrep]:
    """A random CLIPModel of a few thousand parameters with an offline tokenizer (same classes as the real ones)."""
    from transformers import CLIPConfig, CLIPModel


    tok = tiny_clip_tokenizer(max_length=16)
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    return model.eval(), tok, ImagePrep(image_size, image_size)


def optional_import(module: str, reward: str, package: str, extra: str = "gpu-rewards") -> Any:
    """Import an optional extra lazily; a missing one names the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"reward '{reward}' needs the optional package '{package}' (import {module} failed: {e}); "
                        f"install it with: {install_hint(extra)}") from e
