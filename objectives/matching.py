"""Flow-matching errors on noised final samples, shared by the objectives that regress velocities (NFT, AWM)."""
from __future__ import annotations

import torch

from estimators.base import Estimate

MATCHING_WEIGHTINGS = ("uniform", "t", "adaptive")


def _bcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def matching_error(est: Estimate, x0: torch.Tensor, v: torch.Tensor, weighting: str = "uniform") -> torch.Tensor:
    """[M] per-evaluation flow-matching error of velocities v at the estimator's inputs x_t of final samples x0 [U].

    uniform: mean |v - (eps - x0)|^2 (rectified-flow pretraining loss); t: t times it (AWM's t weighting);
    adaptive: mean |x0_hat - x0|^2 / sg(mean |x0_hat - x0|) with x0_hat = x_t - t v (DiffusionNFT's adaptive loss).
    eps - x0 = (x_t - x0) / t holds for any noising, fresh or read off a trajectory.
    """
    x0_e = x0[est.unit_of_eval]
    t = _bcast(est.t_in, x0_e)
    if weighting == "adaptive":
        diff = est.x_in - t * v - x0_e
        # DiffusionNFT clips the normaliser at 1e-5 (in float64); the clamp keeps a perfect fit finite.
        norm = diff.detach().abs().flatten(1).mean(1).clamp_min(1e-5)
        return (diff**2).flatten(1).mean(1) / norm
    err = (v - (est.x_in - x0_e) / t).pow(2).flatten(1).mean(1)
    if weighting == "t":
        return est.t_in * err
    if weighting == "uniform":
        return err
    raise ValueError(f"unknown matching weighting '{weighting}'; valid: {', '.join(MATCHING_WEIGHTINGS)}")


def per_unit(values: torch.Tensor, est: Estimate, units: int) -> torch.Tensor:
    """[U] mean over each unit's evaluations (its J noisings)."""
    total = torch.zeros(units, dtype=values.dtype, device=values.device).index_add(0, est.unit_of_eval, values)
    count = torch.bincount(est.unit_of_eval, minlength=units).clamp_min(1)
    return total / count
