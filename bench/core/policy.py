"""The policy interface every world implements, and the one metered way to call it."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.func import functional_call

from bench.core.families import FLOW, ModelFamily
from bench.core.meter import ComputeMeter

Cond = Any  # a tensor, or a dict of tensors, with the batch on dim 0


def index_cond(cond: Cond, idx: torch.Tensor) -> Cond:
    """Select rows of a conditioning batch (tensor or dict of tensors)."""
    if isinstance(cond, Mapping):
        return {k: index_cond(v, idx) for k, v in cond.items()}
    return cond[idx]


def cat_cond(a: Cond, b: Cond) -> Cond:
    if isinstance(a, Mapping):
        return {k: cat_cond(a[k], b[k]) for k in a}
    return torch.cat([a, b], 0)


class Policy(nn.Module):
    """A generative model exposing `velocity(x, t, cond)`: its network output at time t (1 = noise).

    `family` says what that output is (bench.core.families): a flow velocity v = eps - x0 in SD3's convention (the
    default), or a VP model's eps / v prediction. Samplers, estimators and objectives convert through it.
    """

    family: ModelFamily = FLOW

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        raise NotImplementedError

    def null_cond(self, cond: Cond) -> Cond:
        """The unconditional input matching `cond`'s batch, for classifier-free guidance."""
        raise NotImplementedError

    def trainable_named_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A detached copy of the trainable parameters (old policy, EMA, reference)."""
        return {n: p.detach().clone() for n, p in self.trainable_named_parameters().items()}

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.velocity(x, t, cond)


class PolicyCall:
    """Evaluates a policy, optionally with substituted parameters and CFG, counting every forward."""

    def __init__(self, policy: Policy, meter: ComputeMeter, guidance: float = 1.0,
                 params: Mapping[str, torch.Tensor] | None = None, detach_uncond: bool = True):
        self.policy, self.meter, self.guidance = policy, meter, float(guidance)
        self.params, self.detach_uncond = params, detach_uncond

    def with_params(self, params: Mapping[str, torch.Tensor] | None) -> "PolicyCall":
        return PolicyCall(self.policy, self.meter, self.guidance, params, self.detach_uncond)

    def _raw(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        self.meter.count_forward(x.shape[0])
        if self.params is None:
            return self.policy.velocity(x, t, cond)
        # functional_call swaps in the old/EMA/reference weights without copying the model.
        return functional_call(self.policy, dict(self.params), (x, t, cond), strict=False)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if self.guidance == 1.0:
            return self._raw(x, t, cond)
        null = self.policy.null_cond(cond)
        if self.detach_uncond and torch.is_grad_enabled():
            # DESIGN section 3: the unconditional branch is detached during training.
            v_c = self._raw(x, t, cond)
            with torch.no_grad():
                v_u = self._raw(x, t, null)
        else:
            v_u, v_c = self._raw(torch.cat([x, x]), torch.cat([t, t]), cat_cond(null, cond)).chunk(2)
        return v_u + self.guidance * (v_c - v_u)
