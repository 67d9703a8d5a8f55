"""Deterministic Euler ODE rollouts (the ELBO paper's sampler, arXiv 2602.04663)."""
from samplers import SAMPLERS
from samplers.base import ChainSampler
from samplers.kernels import EulerODE


@SAMPLERS.register("ode")
class ODESampler(ChainSampler):
    """Probability-flow ODE with Euler steps: no stochastic edges, final-sample estimators only."""

    stochastic = False
    kernel = EulerODE()
