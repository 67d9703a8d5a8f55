"""The SD3 policy: diffusers' SD3Transformer2DModel with trainable LoRA adapters (peft) on its attention projections."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from bench.core.errors import UserError
from bench.core.policy import Cond, Policy

# Named LoRA target sets, usable as items of world.lora.targets beside plain module-name suffixes.
LORA_TARGET_SETS = {
    # Flow-GRPO, DiffusionNFT, AWM and the ELBO repo (scripts/train_sd3.py `target_modules`): both streams of the
    # joint attention `attn`; SD3.5's second, image-only attention `attn2` is left alone. 191 layers on SD3.5-M.
    "joint_attention": ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                        "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"),
    # The image-stream projections of every attention (attn and attn2), no text stream: 148 layers on SD3.5-M.
    "image_attention": ("to_q", "to_k", "to_v", "to_out.0"),
}
# Flow-GRPO (Liu et al. 2025, arXiv 2505.05470) trains LoRA r=32, alpha=64 on the joint-attention set.
DEFAULT_TARGETS = ("joint_attention",)


def lora_targets(targets: Sequence[str]) -> list[str]:
    """Module-name suffixes for peft: each item is a LORA_TARGET_SETS name (expanded) or a suffix (kept)."""
    out: list[str] = []
    for t in targets:
        out.extend(LORA_TARGET_SETS.get(str(t), (str(t),)))
    return list(dict.fromkeys(out))
ADAPTER = "default"


def add_lora(transformer: nn.Module, r: int = 32, alpha: float = 64, targets: Sequence[str] = DEFAULT_TARGETS,
             dtype: torch.dtype = torch.float32, seed: int | None = None) -> None:
    """Inject a peft LoRA adapter (B = 0, so the adapted model starts exactly at the base model), LoRA kept in `dtype`."""
    from peft import LoraConfig

    if int(r) < 1:
        raise UserError(f"world.lora.r={r} must be >= 1")
    targets = lora_targets(targets)
    names = {n for n, _ in transformer.named_modules()}
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise UserError(f"world.lora.targets {missing} match no module of {type(transformer).__name__}; "
                        f"valid: a set ({', '.join(LORA_TARGET_SETS)}) or suffixes such as attn.to_q, "
                        "attn.add_q_proj, attn.to_add_out, to_out.0")
    # No LoRA dropout: the policy runs in eval mode (deterministic rollouts, ratios exactly 1 before an update),
    # where dropout would be off anyway.
    config = LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=0.0, init_lora_weights="gaussian",
                        target_modules=targets)
    # lora_A's random init draws from the global RNG; a local fork keeps it reproducible without moving the cell's RNG.
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        transformer.add_adapter(config, adapter_name=ADAPTER)
    for n, p in transformer.named_parameters():
        if "lora_" in n:
            # bf16 base weights, fp32 adapters (as Flow-GRPO's cast_training_params): Adam on bf16 LoRA stalls.
            p.data = p.data.to(dtype)
            p.requires_grad_(True)
        else:
            p.requires_grad_(False)


class SD3Policy(Policy):
    """velocity(x, t, cond) = SD3Transformer2DModel(x, timestep=1000 t, prompt embeddings); only LoRA is trainable.

    `cond` is {"prompt_embeds": [B, L, D], "pooled_prompt_embeds": [B, P]}; `null` holds the empty prompt's
    embeddings ([1, L, D], [1, P]) for classifier-free guidance. Old, EMA and reference policies are LoRA parameter
    dicts swapped in by torch.func.functional_call (bench.core.policy.PolicyCall); LoRA starts at B = 0, so the snapshot
    taken before the first update is the adapters-disabled base model (the reference policy).
    """

    def __init__(self, transformer: nn.Module, null: Mapping[str, torch.Tensor], num_train_timesteps: int = 1000,
                 gradient_checkpointing: bool = False):
        super().__init__()
        self.transformer = transformer
        # Not registered as buffers: they are inputs, not parameters, and must stay out of checkpoints.
        self._null = {k: v.detach() for k, v in null.items()}
        self.num_train_timesteps = int(num_train_timesteps)
        if gradient_checkpointing:
            # diffusers only checkpoints when grad is enabled, so no-grad old/reference evaluations (where
            # functional_call swaps parameters) never recompute under the wrong weights.
            transformer.enable_gradient_checkpointing()

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's weight dtype (inputs are cast to it; LoRA may differ)."""
        return self.transformer.pos_embed.proj.weight.dtype

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Flow velocity v = eps - x0 in float32 (diffusers SD3 convention: timestep = 1000 t)."""
        dt = self.dtype
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        # The timestep stays float32 (as the pipeline passes it): diffusers builds the sinusoidal embedding in
        # float32 and casts after; 1000 t rounded to bf16 first would move it by up to 4 steps.
        out = self.transformer(hidden_states=x.to(dt), timestep=t.float() * self.num_train_timesteps,
                               encoder_hidden_states=cond["prompt_embeds"].to(dt),
                               pooled_projections=cond["pooled_prompt_embeds"].to(dt), return_dict=False)[0]
        return out.float()

    def null_cond(self, cond: Cond) -> Cond:
        """The empty prompt's embeddings, repeated to `cond`'s batch (SD3's negative prompt "")."""
        b = cond["prompt_embeds"].shape[0]
        return {k: v.to(cond[k].device).expand(b, *v.shape[1:]) for k, v in self._null.items()}

    def trainable_named_parameters(self) -> dict[str, nn.Parameter]:
        """Only the LoRA adapter weights."""
        return {n: p for n, p in self.named_parameters() if "lora_" in n and p.requires_grad}

    @contextmanager
    def adapters_disabled(self) -> Iterator["SD3Policy"]:
        """The reference policy (base SD3, adapters off) inside the block, whatever the LoRA weights are now."""
        self.transformer.disable_adapters()
        try:
            yield self
        finally:
            self.transformer.enable_adapters()

    def lora_config(self) -> dict[str, Any]:
        """The adapter's rank, alpha and target modules."""
        cfg = self.transformer.peft_config[ADAPTER]
        return {"r": cfg.r, "alpha": cfg.lora_alpha, "targets": sorted(cfg.target_modules)}
