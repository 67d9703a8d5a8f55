"""The EMA old policy and its decay schedule (DiffusionNFT, arXiv 2509.16117)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from bench.errors import UserError


def ema_decay(train_cfg: Mapping[str, Any], iteration: int) -> float:
    """Decay applied after iteration `iteration` (1-based): train.ema_decay, or with train.ema_ramp = {rate, flat}
    DiffusionNFT's ramp min(ema_decay, rate * max(0, iteration - flat)), so the old policy starts on-policy and
    lags more as training settles."""
    cap = float(train_cfg.get("ema_decay", 0.9))
    ramp = train_cfg.get("ema_ramp")
    if not 0 <= cap < 1:
        raise UserError(f"train.ema_decay={cap} must be in [0, 1)")
    if ramp is None:
        return cap
    unknown = set(ramp) - {"rate", "flat"}
    if unknown:
        raise UserError(f"unknown train.ema_ramp keys {sorted(unknown)}; valid: rate, flat")
    rate, flat = float(ramp.get("rate", 0.001)), int(ramp.get("flat", 0))
    return min(cap, rate * max(0, iteration - flat))


def ema_update(ema: dict[str, torch.Tensor], params: Mapping[str, torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, in place."""
    with torch.no_grad():
        for name, p in params.items():
            ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)
