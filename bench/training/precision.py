"""Mixed precision of the policy (train.mixed_precision): its forwards and their backward under torch.autocast in
bf16 or fp16, fp32 master weights for what trains, fp32 outputs so log-probs and ELBOs are fp32 (DESIGN section 3),
and for fp16 a GradScaler (unscaled before clipping; a step with inf/NaN gradients is skipped, the scale halved).

Frozen weights keep the dtype their world loads them in (sd3: world.dtype, bf16 for the full model): autocast
computes in its dtype either way, so they may be float32 or the autocast dtype, never the other half type.
`accelerate launch --mixed_precision X` (ACCELERATE_MIXED_PRECISION) must agree with train.mixed_precision.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from bench.core.errors import UserError
from bench.core.meter import ComputeMeter
from bench.core.policy import Cond, Policy, PolicyCall

MIXED_PRECISIONS = ("no", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ACCELERATE_ENV = "ACCELERATE_MIXED_PRECISION"


def check_launch(mode: str) -> None:
    """UserError when `accelerate launch --mixed_precision` says otherwise than train.mixed_precision."""
    launched = os.environ.get(ACCELERATE_ENV)
    if launched is not None and launched.lower() != mode:
        raise UserError(f"train.mixed_precision={mode} but accelerate launch --mixed_precision {launched} "
                        f"({ACCELERATE_ENV}); valid: train.mixed_precision={launched.lower()} or launch with "
                        f"--mixed_precision {mode}")


class AutocastCall(PolicyCall):
    """A PolicyCall whose policy forwards run under torch.autocast and come back float32."""

    def __init__(self, policy: Policy, meter: ComputeMeter, guidance: float = 1.0,
                 params: Mapping[str, torch.Tensor] | None = None, detach_uncond: bool = True, *,
                 dtype: torch.dtype, device_type: str):
        super().__init__(policy, meter, guidance, params, detach_uncond)
        self.dtype, self.device_type = dtype, device_type

    def with_params(self, params: Mapping[str, torch.Tensor] | None) -> "AutocastCall":
        return AutocastCall(self.policy, self.meter, self.guidance, params, self.detach_uncond, dtype=self.dtype,
                            device_type=self.device_type)

    def _raw(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = super()._raw(x, t, cond)
        # CFG's combination, kernels, log-probs and ELBOs all run on this, outside autocast: fp32.
        return out.float()


class Precision:
    """One cell's precision: how it calls the policy, backpropagates, clips and steps."""

    def __init__(self, mode: str, device: torch.device | str):
        if mode not in MIXED_PRECISIONS:
            raise UserError(f"train.mixed_precision={mode}: unknown; valid: {', '.join(MIXED_PRECISIONS)}")
        self.mode = mode
        self.dtype = AUTOCAST_DTYPES.get(mode)
        self.device_type = torch.device(device).type
        self.scaler = torch.amp.GradScaler(self.device_type) if mode == "fp16" else None

    def check(self, policy: Policy) -> None:
        """UserError unless trainable weights are fp32 and frozen ones fp32 or the autocast dtype."""
        if self.dtype is None:
            return
        trainable = policy.trainable_named_parameters()
        low = sorted({str(p.dtype).removeprefix("torch.") for p in trainable.values() if p.dtype != torch.float32})
        if low:
            raise UserError(f"train.mixed_precision={self.mode}: trainable weights are {', '.join(low)}; valid: "
                            "float32 master weights (world.lora.dtype=float32)")
        ids = {id(p) for p in trainable.values()}
        other = (torch.bfloat16, torch.float16)[self.dtype == torch.bfloat16]
        if any(p.dtype == other for p in policy.parameters() if id(p) not in ids):
            name = str(other).removeprefix("torch.")
            raise UserError(f"train.mixed_precision={self.mode}: frozen weights are {name}; valid: world.dtype="
                            f"float32 or {str(self.dtype).removeprefix('torch.')}")

    def policy_call(self, policy: Policy, meter: ComputeMeter, guidance: float, detach_uncond: bool) -> PolicyCall:
        """The metered policy call, under autocast unless mixed precision is off."""
        if self.dtype is None:
            return PolicyCall(policy, meter, guidance=guidance, detach_uncond=detach_uncond)
        return AutocastCall(policy, meter, guidance, detach_uncond=detach_uncond, dtype=self.dtype,
                            device_type=self.device_type)

    @property
    def skips_bad_steps(self) -> bool:
        """True with a GradScaler: non-finite gradients skip the step instead of stopping the cell."""
        return self.scaler is not None

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def clip(self, opt: torch.optim.Optimizer, params: Any, max_norm: float) -> torch.Tensor:
        """The gradients' total norm (unscaled first), clipped to max_norm."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def step(self, opt: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            opt.step()
            return
        self.scaler.step(opt)  # skipped when unscale_ found inf/NaN
        self.scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
