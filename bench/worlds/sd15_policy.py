"""The SD1.5 policy: diffusers' UNet2DConditionModel (epsilon prediction) with peft LoRA, and its prompt encoder."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from bench.core.families import VariancePreserving
from bench.core.policy import Cond
from bench.worlds.sd3_policy import SD3Policy
from bench.worlds.sd3_text import SD3PromptEncoder


def scheduler_family(scheduler: Any) -> VariancePreserving:
    """The VP family of a diffusers DDIMScheduler: its alphas_cumprod table, prediction type and DDIM grid."""
    c = scheduler.config
    return VariancePreserving(scheduler.alphas_cumprod, c.prediction_type, bool(c.set_alpha_to_one),
                              int(c.steps_offset), str(c.timestep_spacing))


class SD15Policy(SD3Policy):
    """eps_theta(x, t, cond) = UNet2DConditionModel(x, the DDIM timestep of t, CLIP text states); LoRA trainable.

    The SD3 policy's LoRA handling (trainable LoRA parameters, adapters_disabled for the reference, functional_call
    swaps) applies unchanged to the UNet, which it holds as `transformer`; `family` converts the UNet's eps.
    """

    def __init__(self, unet: nn.Module, null: Mapping[str, torch.Tensor], family: VariancePreserving,
                 gradient_checkpointing: bool = False):
        super().__init__(unet, null, family.num_train_timesteps, gradient_checkpointing)
        self.family = family

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's weight dtype."""
        return self.transformer.conv_in.weight.dtype

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The UNet's epsilon prediction in float32, at diffusers' integer timestep for grid times."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        out = self.transformer(x.to(self.dtype), self.family.model_time(t),
                               encoder_hidden_states=cond["prompt_embeds"].to(self.dtype), return_dict=False)[0]
        return out.float()


class SD15PromptEncoder(SD3PromptEncoder):
    """StableDiffusionPipeline.encode_prompt (clip_skip None): CLIP's last hidden states at the tokenizer's max
    length, each prompt encoded once (the SD3 encoder's cache); the pooled output rides along unused."""

    def __init__(self, comps: Mapping[str, Any], device: torch.device, cache_device: torch.device | str | None = None):
        # Only the attributes the cache in SD3PromptEncoder.__call__ reads: SD1.5 has one tokenizer and encoder.
        self.tok, self.enc = [comps["tokenizer"]], [comps["text_encoder"]]
        self.device = torch.device(device)
        self.cache_device = torch.device(cache_device) if cache_device is not None else self.device
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tok[0](prompts, padding="max_length", max_length=self.tok[0].model_max_length, truncation=True,
                          return_tensors="pt").input_ids.to(self.device)
        out = self.enc[0](ids)
        return out[0].to(self.dtype), out[1]
