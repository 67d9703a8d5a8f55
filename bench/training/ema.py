"""The EMA old policy and its decay schedule (DiffusionNFT, arXiv 2509.16117)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from bench.core.errors import UserError


EMA_RAMP_COUNTS = ("iterations", "optimizer_steps")


def optimizer_steps(opt: torch.optim.Optimizer) -> int:
    """Optimizer steps taken so far, read from Adam's own per-parameter counter (so it survives a resume)."""
    steps = [int(st["step"]) for st in opt.state.values() if "step" in st]
    return max(steps, default=0)


def ema_decay(train_cfg: Mapping[str, Any], iteration: int, steps: int | None = None) -> float:
    """Decay applied after iteration `iteration` (1-based): train.ema_decay, or with train.ema_ramp = {rate, flat,
    count} DiffusionNFT's ramp min(ema_decay, rate * max(0, n - flat)), so the old policy starts on-policy and lags
    more as training settles. n counts iterations, or optimizer steps so far (`steps`; DiffusionNFT's and the ELBO
    repo's `global_step`) with count=optimizer_steps."""
    cap = float(train_cfg.get("ema_decay", 0.9))
    ramp = train_cfg.get("ema_ramp")
    if not 0 <= cap < 1:
        raise UserError(f"train.ema_decay={cap} must be in [0, 1)")
    if ramp is None:
        return cap
    unknown = set(ramp) - {"rate", "flat", "count"}
    if unknown:
        raise UserError(f"unknown train.ema_ramp keys {sorted(unknown)}; valid: count, flat, rate")
    rate, flat = float(ramp.get("rate", 0.001)), int(ramp.get("flat", 0))
    count = str(ramp.get("count", "iterations"))
    if count not in EMA_RAMP_COUNTS:
        raise UserError(f"train.ema_ramp.count={count}: unknown value; valid: {', '.join(EMA_RAMP_COUNTS)}")
    if count == "optimizer_steps" and steps is None:
        raise UserError("train.ema_ramp.count=optimizer_steps needs the optimizer step count")
    n = iteration if count == "iterations" else int(steps)
    return min(cap, rate * max(0, n - flat))


def ema_update(ema: dict[str, torch.Tensor], params: Mapping[str, torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, in place."""
    with torch.no_grad():
        for name, p in params.items():
            ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)


class EvalEMA:
    """EMA of the trainable weights that evaluation uses (train.eval_ema; Flow-GRPO, DanceGRPO, AWM keep one),
    separate from the EMA old policy: after every `every`-th optimizer step, ema <- decay ema + (1 - decay) theta."""

    def __init__(self, params: Mapping[str, torch.Tensor], decay: float, every: int):
        self.decay, self.every = float(decay), int(every)
        self.weights = {n: p.detach().clone() for n, p in params.items()}
        self.steps = 0

    def step(self, params: Mapping[str, torch.Tensor]) -> None:
        """Count one optimizer step; average on every `every`-th."""
        self.steps += 1
        if self.steps % self.every == 0:
            ema_update(self.weights, params, self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # A checkpoint's tensors are on the CPU: back onto the weights' device.
        self.weights = {n: state["weights"][n].to(w.device, w.dtype, copy=True) for n, w in self.weights.items()}
        self.steps = int(state["steps"])
