"""SD3 prompt encoding (two CLIP encoders + T5, as StableDiffusion3Pipeline.encode_prompt), cached per prompt."""
from __future__ import annotations

from typing import Any, Mapping

import torch


class SD3PromptEncoder:
    """Frozen text encoders -> {"prompt_embeds": [B, 77 + L, D], "pooled_prompt_embeds": [B, 2 P]}, each prompt once.

    Matches diffusers' StableDiffusion3Pipeline.encode_prompt with clip_skip=None: the CLIP penultimate hidden
    states (concatenated, zero-padded to T5's width) followed by T5's last hidden states; the pooled vector is the two
    CLIP projections concatenated. Without T5 its slot is zeros of width `joint_attention_dim`, as in diffusers.
    """

    def __init__(self, comps: Mapping[str, Any], device: torch.device, max_sequence_length: int = 256,
                 joint_attention_dim: int | None = None, cache_device: torch.device | str | None = None):
        self.tok = [comps["tokenizer"], comps["tokenizer_2"]]
        self.enc = [comps["text_encoder"], comps["text_encoder_2"]]
        self.tok3, self.enc3 = comps.get("tokenizer_3"), comps.get("text_encoder_3")
        self.device = torch.device(device)
        self.max_sequence_length = int(max_sequence_length)
        self.joint_attention_dim = joint_attention_dim
        # Real SD3 embeddings are ~2.7 MB per prompt in bf16; a CPU cache keeps large prompt sets off the GPU.
        self.cache_device = torch.device(cache_device) if cache_device is not None else self.device
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def dtype(self) -> torch.dtype:
        """The dtype embeddings are returned in (the first CLIP encoder's, as the pipeline)."""
        return self.enc[0].dtype

    @torch.no_grad()
    def _clip(self, prompts: list[str], i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The pipeline pads both CLIP tokenizers to the *first* tokenizer's model_max_length.
        ids = self.tok[i](prompts, padding="max_length", max_length=self.tok[0].model_max_length, truncation=True,
                          return_tensors="pt").input_ids.to(self.device)
        out = self.enc[i](ids, output_hidden_states=True)
        return out.hidden_states[-2].to(self.dtype), out[0]

    @torch.no_grad()
    def _t5(self, prompts: list[str]) -> torch.Tensor:
        if self.enc3 is None:
            if self.joint_attention_dim is None:
                raise ValueError("without T5 the encoder needs joint_attention_dim (the transformer's config)")
            return torch.zeros(len(prompts), self.max_sequence_length, self.joint_attention_dim, device=self.device,
                               dtype=self.dtype)
        ids = self.tok3(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
        return self.enc3(ids)[0].to(self.enc3.dtype)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        h1, p1 = self._clip(prompts, 0)
        h2, p2 = self._clip(prompts, 1)
        t5 = self._t5(prompts)
        clip = torch.nn.functional.pad(torch.cat([h1, h2], -1), (0, t5.shape[-1] - h1.shape[-1] - h2.shape[-1]))
        return torch.cat([clip, t5], -2), torch.cat([p1, p2], -1)

    def __call__(self, prompts: list[str], batch_size: int = 32) -> dict[str, torch.Tensor]:
        """Embeddings for `prompts` (rows in order, duplicates allowed), encoding only prompts not seen before."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        for i in range(0, len(new), batch_size):
            chunk = new[i:i + batch_size]
            emb, pooled = self._encode(chunk)
            for j, p in enumerate(chunk):
                self._cache[p] = (emb[j].to(self.cache_device), pooled[j].to(self.cache_device))
        rows = [self._cache[p] for p in prompts]
        return {"prompt_embeds": torch.stack([r[0] for r in rows]).to(self.device),
                "pooled_prompt_embeds": torch.stack([r[1] for r in rows]).to(self.device)}

    def __len__(self) -> int:
        return len(self._cache)
