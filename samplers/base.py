"""The sampler interface and the chain sampler that trajectory schemes share."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from bench.core.families import FLOW, ModelFamily
from bench.core.policy import Cond, PolicyCall, index_cond
from bench.core.schema import Configurable, Option
from samplers.kernels import EulerODE, transition_logp
from samplers.rollout import ODE, SDE, Rollout, RolloutBuilder
from samplers.schedule import TIME_GRIDS, time_grid
from samplers.solvers import ODE_SOLVERS, ODESolver, ode_solver


def randn(shape: tuple, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """Noise drawn on the CPU generator so a seed gives the same numbers on every device."""
    return torch.randn(shape, generator=generator).to(device)


def stochastic_step(kernel: Any, x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                    schedule: torch.Tensor, generator: torch.Generator, branches: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SDE step with `branches` children per node around the node's one mean (TreeGRPO; 1 for chains).

    Returns, per child [B * branches]: the sample, the transition mean and scale, and the log-density summed
    over dims. Children of node b are rows b * branches ... (b + 1) * branches - 1.
    """
    mu, s = kernel.mean_scale(x, v, sigma, sigma_next, schedule)
    if branches > 1:
        mu, s = mu.repeat_interleave(branches, 0), s.repeat_interleave(branches, 0)
    x_next = mu + s.view(-1, *[1] * (x.ndim - 1)) * randn(mu.shape, generator, x.device)
    return x_next, mu, s, transition_logp(kernel, x_next, mu, s, "sum")


class Sampler(Configurable):
    """A rollout scheme: draws samples for prompts and records them as a Rollout."""

    GROUP = "sampler"
    OPTIONS = {
        "steps": Option(10, int, low=1, help="sampling steps T"),
        "shift": Option(1.0, float, low=0, low_open=True, help="SD3's time shift (the configs take the world's)"),
        "guidance": Option(1.0, float, low=0, help="CFG scale of rollouts; 1 = off"),
        "time_grid": Option("linspace", str, choices=TIME_GRIDS,
                            help="linspace: shift(linspace(1, 0, T+1)) (DanceGRPO, MixGRPO); scheduler: diffusers' "
                                 "FlowMatchEulerDiscreteScheduler.set_timesteps grid (Flow-GRPO, NFT, ELBO repo, AWM)"),
    }
    stochastic: bool = True  # has SDE edges (stepwise estimators need them)
    shares_prefixes: bool = False  # several leaves below one edge (trees): edge advantages need a tree backup

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = self.resolve_options(cfg)
        self.steps = int(self.cfg["steps"])
        self.shift = float(self.cfg["shift"])
        self.guidance = float(self.cfg["guidance"])
        self.time_grid = str(self.cfg["time_grid"])

    def schedule(self, family: ModelFamily = FLOW) -> torch.Tensor:
        """The time grid: `time_grid` on flow models, DDIM's timesteps on VP models."""
        return family.schedule(self.steps, self.shift, self.time_grid)

    def samples_per_prompt(self, group_size: int) -> int:
        """Final samples per prompt for a requested group size (trees may round)."""
        return group_size

    def family_incompatibility(self, family_name: str) -> str | None:
        """Why this sampler cannot roll out a world whose model family is `family_name` (a World's `family_name`:
        flow or vp), or None: flow-matching SDE kernels and flow-time solvers need a flow model."""
        kernel = getattr(self, "kernel", None)
        families = getattr(kernel, "families", ("flow", "vp"))
        if family_name not in families:
            return (f"sampler '{self.cfg.get('name')}' steps with the flow-matching {type(kernel).__name__}; the "
                    f"world's model is {family_name} (use ddim)")
        solver = self.cfg.get("solver", self.cfg.get("post_solver", "euler"))
        if family_name != "flow" and solver != "euler":
            return f"sampler '{self.cfg.get('name')}' solver {solver} integrates flow velocities; the world's model is {family_name}"
        return None

    def sample(self, model: PolicyCall, prompts: list[str], cond: Cond, group_size: int, shape: tuple,
               generator: torch.Generator, iteration: int = 0) -> Rollout:
        raise NotImplementedError


def trained_count(fraction: float, n_sde: int, rounding: str) -> int:
    """How many of n_sde stochastic steps a chain trains: round(fraction n) (nearest) or int(fraction n) (floor,
    Flow-GRPO's and DanceGRPO's), at least 1."""
    if not n_sde:
        return 0
    return max(1, round(fraction * n_sde) if rounding == "nearest" else int(fraction * n_sde))


class ChainSampler(Sampler):
    """G independent chains per prompt; `kernel` on the stochastic steps, Euler ODE elsewhere.

    Options: `sde_window: [start, stop)` step indices that are stochastic (default all),
    `train_fraction` of the stochastic steps trained per chain (Flow-GRPO/DanceGRPO subsets),
    `shared_noise` (one initial noise per group, as DanceGRPO).
    """

    OPTIONS = {
        "sde_window": Option(None, list, nullable=True, length=2, item=Option(0, int, low=0),
                             help="[start, stop) step indices that are stochastic; null = all"),
        "train_fraction": Option(1.0, float, low=0, low_open=True, high=1,
                                 help="fraction of the stochastic steps trained per chain"),
        "shared_noise": Option(False, bool, help="one initial noise per group (DanceGRPO)"),
        "train_rounding": Option("nearest", str, choices=("nearest", "floor"),
                                 help="trained steps per chain: round(f n) or int(f n) (Flow-GRPO's int(0.99 T), "
                                      "DanceGRPO's int(0.6 T)); at least 1"),
        "train_steps": Option("random", str, choices=("random", "first"),
                              help="which stochastic steps a chain trains: a random subset each (DanceGRPO) or the "
                                   "first ones in sampling order (Flow-GRPO)"),
        "score": Option("sample", str, choices=("sample", "x0_hat"),
                        help="what the reward sees: the final sample, or the last step's x0 prediction x - sigma v "
                             "(DanceGRPO, MixGRPO)"),
        "solver": Option("euler", str, choices=tuple(ODE_SOLVERS),
                         help="solver of the deterministic steps (DiffusionNFT, the ELBO repo: dpmpp_2m)"),
    }
    kernel: Any = EulerODE()

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__(cfg)
        self.train_rounding, self.train_steps = str(self.cfg["train_rounding"]), str(self.cfg["train_steps"])
        self.score, self.solver = str(self.cfg["score"]), str(self.cfg["solver"])

    def plan(self, iteration: int, generator: torch.Generator, family: ModelFamily = FLOW
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """This iteration's time grid [S+1] and which of its S steps are stochastic (windowed schemes override)."""
        return self.schedule(family), self.sde_steps(iteration)

    def ode_solver(self, sde: torch.Tensor) -> ODESolver:
        """A fresh solver for the deterministic steps of one rollout (MixGRPO-Flash uses a higher order after its window)."""
        return ode_solver(self.solver)

    def sde_steps(self, iteration: int) -> torch.Tensor:
        """[T] bool: which steps are stochastic at this iteration."""
        mask = torch.zeros(self.steps, dtype=torch.bool)
        if not self.kernel.stochastic:
            return mask
        window = self.cfg.get("sde_window")
        start, stop = (0, self.steps) if window is None else (int(window[0]), int(window[1]))
        if not 0 <= start < stop <= self.steps:
            raise ValueError(f"sde_window {window} must satisfy 0 <= start < stop <= steps={self.steps}")
        mask[start:stop] = True
        return mask

    def trained_mask(self, sde: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
        """[T, B] bool: which stochastic steps each chain trains on."""
        frac = float(self.cfg.get("train_fraction", 1.0))
        mask = sde.unsqueeze(1).expand(-1, batch).clone()
        n_sde = int(sde.sum())
        keep = trained_count(frac, n_sde, self.train_rounding)
        if keep < n_sde:
            idx = sde.nonzero().squeeze(1)
            mask[:] = False
            if self.train_steps == "first":
                mask[idx[:keep]] = True
                return mask
            # An independent random subset per chain, drawn for all chains at once (argsort of uniforms).
            chosen = idx[torch.rand(batch, n_sde, generator=generator).argsort(1)[:, :keep]]
            mask[chosen, torch.arange(batch).unsqueeze(1)] = True
        return mask

    def sample(self, model, prompts, cond, group_size, shape, generator, iteration=0):
        device = next(model.policy.parameters()).device
        p, g = len(prompts), group_size
        slot = torch.arange(p).repeat_interleave(g)
        if self.cfg.get("shared_noise", False):
            x = randn((p, *shape), generator, device).repeat_interleave(g, 0)
        else:
            x = randn((p * g, *shape), generator, device)
        cond_b = index_cond(cond, slot.to(device))
        # The model's family decides what its output means: the kernel and solver convert through it.
        family = model.policy.family
        kernel = self.kernel.bind(family)
        sched, sde = self.plan(iteration, generator, family)
        sched = sched.to(device)
        builder = RolloutBuilder(sched, prompts, cond, kernel, self.guidance, family)
        ids = builder.add(x, 0, slot)
        trained = self.trained_mask(sde, p * g, generator).to(device)
        solver = self.ode_solver(sde).for_family(family)
        scored = None
        # Python bools and per-step time views read once: a tensor test per step is a sync (and an op) each.
        stochastic, times = sde.tolist(), sched.expand(p * g, -1).unbind(1)
        for i, is_sde in enumerate(stochastic):
            sigma, sigma_next = times[i], times[i + 1]
            v = model(x, sigma, cond_b)
            if self.score == "x0_hat" and i == len(stochastic) - 1:
                scored = family.x0_eps(x, v, sched[i])[0]
            if is_sde:
                x, mu, s, logp = stochastic_step(kernel, x, v, sigma, sigma_next, sched, generator)
                ids = builder.add(x, i + 1, slot, ids, SDE, mu, s, logp, trained[i])
            else:
                x = solver.step(model, x, v, i, sched, cond_b)
                ids = builder.add(x, i + 1, slot, ids, ODE)
        return builder.build(leaves=ids, scored=scored)
