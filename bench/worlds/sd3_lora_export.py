"""The trained LoRA in diffusers' format: a safetensors file that `pipe.load_lora_weights(path)` loads with the
right scaling, and the reverse, a policy initialised from such a file (train.init_lora).

Keys are `<component>.<module>.lora_A.weight` (peft's get_peft_model_state_dict, prefixed as diffusers'
save_lora_weights packs them), and the adapter's LoraConfig (r, lora_alpha, target_modules) rides in the file's
`lora_adapter_metadata`, which load_lora_weights turns back into the config: without it diffusers assumes
alpha = r, a scaling of 1 where training used alpha / r.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bench.core.errors import UserError
from bench.core.policy import Policy
from bench.runner import store
from bench.worlds.sd3_policy import ADAPTER

# The network class a policy holds as `transformer` -> (the diffusers pipeline that loads its LoRA, its component).
PIPELINES = {"SD3Transformer2DModel": ("StableDiffusion3Pipeline", "transformer"),
             "UNet2DConditionModel": ("StableDiffusionPipeline", "unet")}
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_OWN_PREFIX = "transformer."  # SD3Policy's attribute holding the network (the UNet too, in SD15Policy)


def exportable(policy: Policy) -> bool:
    """True for a policy that is a peft LoRA on a diffusers network a pipeline can load LoRA into."""
    net = getattr(policy, "transformer", None)
    return ADAPTER in (getattr(net, "peft_config", None) or {}) and type(net).__name__ in PIPELINES


def _pipeline(policy: Policy) -> tuple[Any, str]:
    import diffusers

    name, component = PIPELINES[type(policy.transformer).__name__]
    return getattr(diffusers, name), component


def export_key(name: str, component: str) -> str:
    """A policy parameter name (transformer.<module>.lora_A.default.weight) -> its key in the exported file."""
    module = name.removeprefix(_OWN_PREFIX).replace(f".{ADAPTER}.", ".")
    return f"{component}.{module}"


def export_lora(policy: Policy, path: Path, params: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter (or `params`, e.g. EMA weights, in its place) to `path` atomically, in the format of
    `<Pipeline>.save_lora_weights` (which writes it)."""
    from peft.utils import get_peft_model_state_dict

    cls, component = _pipeline(policy)
    net = policy.transformer
    current = policy.trainable_named_parameters()
    values = {n.removeprefix(_OWN_PREFIX): (current[n] if params is None else params[n]).detach().contiguous()
              for n in current}
    layers = get_peft_model_state_dict(net, state_dict=values, adapter_name=ADAPTER)
    metadata = net.peft_config[ADAPTER].to_dict()
    path = Path(path)
    with store.atomic_path(path) as tmp:
        cls.save_lora_weights(tmp.parent, weight_name=tmp.name, safe_serialization=True,
                              **{f"{component}_lora_layers": layers, f"{component}_lora_adapter_metadata": metadata})
    return path


def check_exported(path: Path | str) -> dict[str, Any] | None:
    """The adapter config (or None) in an exported LoRA file's header; UserError if it is no such file."""
    from safetensors import SafetensorError, safe_open

    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise UserError(f"train.init_lora={path}: no such file; valid: a .safetensors LoRA written by an sd3 cell "
                        "(lora/lora-<iteration>.safetensors) or by a pipeline's save_lora_weights")
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"train.init_lora={path}: not a safetensors file ({e})") from None
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None


def read_exported(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(tensors, adapter config or None) of an exported LoRA file; UserError if it cannot be read."""
    from safetensors.torch import load_file

    config = check_exported(path)
    return load_file(str(Path(str(path)).expanduser())), config


def init_from_lora(policy: Policy, path: Path | str) -> None:
    """Copy an exported LoRA into the policy's adapter (train.init_lora); UserError naming what does not fit."""
    if not exportable(policy):
        raise UserError(f"train.init_lora={path}: this world's policy ({type(policy).__name__}) has no peft LoRA; "
                        "valid: worlds sd3, shapes, sd15")
    tensors, config = read_exported(path)
    _, component = _pipeline(policy)
    cfg = policy.transformer.peft_config[ADAPTER]
    if config is not None:
        # Keys as diffusers packs them: "<component>.r", "<component>.lora_alpha", ...
        r, alpha = config.get(f"{component}.r"), config.get(f"{component}.lora_alpha")
        if (r, alpha) != (cfg.r, cfg.lora_alpha):
            raise UserError(f"train.init_lora={path}: LoRA r={r}, alpha={alpha}; this cell's is r={cfg.r}, "
                            f"alpha={cfg.lora_alpha}; valid: world.lora.r={r} world.lora.alpha={alpha}")
    params = policy.trainable_named_parameters()
    wanted = {export_key(n, component): n for n in params}
    missing, extra = sorted(set(wanted) - set(tensors)), sorted(set(tensors) - set(wanted))
    if missing or extra:
        some = (missing or extra)[:2]
        raise UserError(f"train.init_lora={path}: {len(missing)} adapter weights missing, {len(extra)} unexpected "
                        f"(e.g. {', '.join(some)}); valid: a LoRA on this cell's world.lora.targets")
    with torch.no_grad():
        for key, name in wanted.items():
            p = params[name]
            if tensors[key].shape != p.shape:
                raise UserError(f"train.init_lora={path}: {key} has shape {tuple(tensors[key].shape)}, this cell's "
                                f"{tuple(p.shape)}")
            p.copy_(tensors[key].to(p.dtype))
