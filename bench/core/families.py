"""Model families: how a network's output relates to the data, the noise and the sampler's time (DESIGN section 3).

Both families write the noised sample as x_t = alpha_t x0 + sigma_t eps with time t in [0, 1] (1 = noise):

- `FlowMatching` (SD3): alpha = 1 - t, sigma = t, the network predicts the velocity v = eps - x0.
- `VariancePreserving` (DDPM/DDIM, SD1.5): alpha = sqrt(abar), sigma = sqrt(1 - abar) with abar from a diffusers
  scheduler's alphas_cumprod; the network predicts eps (`epsilon`) or v = alpha eps - sigma x0 (`v_prediction`).
  Discrete timestep k (0..N-1) sits at t = (k + 1) / N; t = 0 is clean data (abar = 1); between knots abar is
  linear in t, so continuous-time draws (the ELBO's) are well defined.

Samplers, estimators and objectives talk to a family through the conversions here (x0 and eps from an output,
an output target from x0 and eps, the score, the deterministic DDIM step, the continuous ELBO weight), written once.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from bench.core.errors import UnknownChoice, UserError
from samplers.schedule import time_grid

PREDICTIONS = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear")
SPACINGS = ("leading", "trailing")


def _bcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(a, device=x.device)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


class ModelFamily:
    """x_t = alpha_t x0 + sigma_t eps, and what the network's output means; subclasses fill in the schedule."""

    name = "family"
    prediction = "output"

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) at times t."""
        raise NotImplementedError

    def alpha2_sigma2(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t^2, sigma_t^2) in t's dtype (VP: abar and 1 - abar, unrounded by square roots)."""
        a, s = self.alpha_sigma(t)
        return a**2, s**2

    def ddim_variance(self, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """The DDIM posterior variance at eta = 1, sigma'^2 (1 - (alpha sigma')^2 / (alpha' sigma)^2) (0 where alpha = 0)."""
        a2, s2 = self.alpha2_sigma2(t)
        a2n, s2n = self.alpha2_sigma2(t_next)
        ratio = torch.where(a2 > 0, a2 * s2n / (a2n * s2).clamp_min(torch.finfo(s2.dtype).tiny), torch.zeros_like(a2))
        return (s2n * (1 - ratio)).clamp_min(0)

    def noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t for data x0 and noise eps at times t (per sample, or already broadcast)."""
        a, s = self.alpha_sigma(t)
        return _bcast(a, x0).to(x0.dtype) * x0 + _bcast(s, x0).to(x0.dtype) * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The output a perfect network gives at x_t = noise(x0, eps, t)."""
        raise NotImplementedError

    def x0_eps(self, x: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) implied by the network output `out` at (x, t)."""
        raise NotImplementedError

    def score(self, x: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad_x log p_t(x) = -eps_hat / sigma_t (Tweedie)."""
        _, s = self.alpha_sigma(t)
        return -self.x0_eps(x, out, t)[1] / _bcast(s, x).to(x.dtype)

    def ode_step(self, x: torch.Tensor, out: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """The deterministic DDIM step (eta = 0) from t to t_next: alpha' x0_hat + sigma' eps_hat."""
        x0, eps = self.x0_eps(x, out, t)
        a, s = self.alpha_sigma(t_next)
        return _bcast(a, x).to(x.dtype) * x0 + _bcast(s, x).to(x.dtype) * eps

    def ode_velocity(self, x: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """dx/dt of the probability-flow ODE in this family's time: alpha'(t) x0_hat + sigma'(t) eps_hat."""
        raise NotImplementedError

    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Weight on |out - target|^2 that makes its time integral the continuous-time ELBO (VDM, arXiv 2107.00630):
        -SNR'(t) / 2 times (d x0_hat / d out)^2."""
        raise NotImplementedError

    def schedule(self, steps: int, shift: float = 1.0, grid: str = "linspace") -> torch.Tensor:
        """[steps + 1] sampling times from noise towards data (`grid`: the flow grid's kind, see samplers.schedule)."""
        raise NotImplementedError

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time the network is conditioned on (flow: 1000 t in SD3's policy; VP: the diffusers timestep)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """What identifies the family (cache keys, reports)."""
        return {"name": self.name, "prediction": self.prediction}


class FlowMatching(ModelFamily):
    """Rectified flow in SD3's convention: x_t = (1 - t) x0 + t eps, output v = eps - x0 (DESIGN section 3).

    The formulas are written out (not through alpha/sigma) so flow models compute exactly what they did before
    families existed.
    """

    name = "flow"
    prediction = "velocity"

    def alpha_sigma(self, t):
        return 1 - t, t

    def noise(self, x0, eps, t):
        t = _bcast(t, x0)
        return (1 - t) * x0 + t * eps

    def target(self, x0, eps, t):
        return eps - x0

    def x0_eps(self, x, out, t):
        t = _bcast(t, x)
        return x - t * out, x + (1 - t) * out

    def ode_step(self, x, out, t, t_next):
        return x + _bcast(t_next - t, x) * out

    def ode_velocity(self, x, out, t):
        return out

    def elbo_weight(self, t):
        return (1 - t) / t

    def schedule(self, steps, shift=1.0, grid="linspace"):
        return time_grid(grid, steps, shift)

    def model_time(self, t):
        return t


def vp_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                      beta_schedule: str = "scaled_linear") -> torch.Tensor:
    """[N] alphas_cumprod computed as diffusers' DDPM/DDIM schedulers do (float32 betas and cumprod)."""
    n = int(num_train_timesteps)
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        # Latent diffusion's schedule (SD1.x): linear in sqrt(beta).
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    else:
        raise UnknownChoice("VP beta_schedule", beta_schedule, list(BETA_SCHEDULES))
    return torch.cumprod(1.0 - betas, dim=0)


class VariancePreserving(ModelFamily):
    """DDPM/DDIM models (Ho et al. 2020; Song et al. 2021): x_t = sqrt(abar) x0 + sqrt(1 - abar) eps.

    `alphas_cumprod` is a diffusers scheduler's [N] table; `final_alpha_cumprod` is where DDIM's last step lands
    (1 with set_alpha_to_one, else alphas_cumprod[0], SD1.5's setting); `steps_offset` and `timestep_spacing`
    place the DDIM timesteps as DDIMScheduler.set_timesteps does.
    """

    name = "vp"

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str = "epsilon", set_alpha_to_one: bool = False,
                 steps_offset: int = 0, timestep_spacing: str = "leading"):
        if prediction not in PREDICTIONS:
            raise UnknownChoice("VP prediction_type", prediction, list(PREDICTIONS))
        if timestep_spacing not in SPACINGS:
            raise UnknownChoice("VP timestep_spacing", timestep_spacing, list(SPACINGS))
        self.prediction = prediction
        ac = torch.as_tensor(alphas_cumprod).detach().double().cpu()
        self.num_train_timesteps = len(ac)
        # Knots at t = k / N: t = 0 is clean data, t = (k + 1) / N is diffusers' timestep k.
        self.knots = torch.cat([torch.ones(1, dtype=torch.float64), ac])
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.steps_offset, self.timestep_spacing = int(steps_offset), timestep_spacing
        self._device_knots: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "VariancePreserving":
        """From a diffusers scheduler config's keys (num_train_timesteps, beta_start, beta_end, beta_schedule,
        prediction_type, set_alpha_to_one, steps_offset, timestep_spacing)."""
        ac = vp_alphas_cumprod(int(cfg.get("num_train_timesteps", 1000)), float(cfg.get("beta_start", 0.00085)),
                               float(cfg.get("beta_end", 0.012)), str(cfg.get("beta_schedule", "scaled_linear")))
        return cls(ac, str(cfg.get("prediction_type", "epsilon")), bool(cfg.get("set_alpha_to_one", False)),
                   int(cfg.get("steps_offset", 0)), str(cfg.get("timestep_spacing", "leading")))

    def spec(self):
        return {**super().spec(), "num_train_timesteps": self.num_train_timesteps,
                "alphas_cumprod_sum": round(float(self.knots.sum()), 9), "set_alpha_to_one": self.set_alpha_to_one,
                "steps_offset": self.steps_offset, "timestep_spacing": self.timestep_spacing}

    # -- the time <-> abar table ----------------------------------------------------------------
    def _steps(self, t: torch.Tensor) -> torch.Tensor:
        """N t in float64, snapped to the integer when within float32 rounding of one (grid times are knots)."""
        s = torch.as_tensor(t).double() * self.num_train_timesteps
        r = s.round()
        return torch.where((s - r).abs() < 1e-3, r, s)

    def _table(self, device: torch.device) -> torch.Tensor:
        if device not in self._device_knots:
            self._device_knots[device] = self.knots.to(device)
        return self._device_knots[device]

    def abar(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(abar(t), d abar / dt) in float64, linear between the knots."""
        t = torch.as_tensor(t)
        knots = self._table(t.device)
        s = self._steps(t).clamp(0, self.num_train_timesteps)
        i = s.floor().long().clamp(max=self.num_train_timesteps - 1)
        slope = (knots[i + 1] - knots[i]) * self.num_train_timesteps
        return knots[i] + (s - i) * (knots[i + 1] - knots[i]), slope

    def alpha2_sigma2(self, t):
        ab, _ = self.abar(t)
        dtype = t.dtype if torch.is_tensor(t) and t.is_floating_point() else torch.float32
        # Rounded to t's dtype first, as DDIMScheduler works on its float32 alphas_cumprod.
        ab = ab.to(dtype)
        return ab, 1 - ab

    def alpha_sigma(self, t):
        ab, one_minus = self.alpha2_sigma2(t)
        return ab.sqrt(), one_minus.sqrt()

    def ddim_variance(self, t, t_next):
        # DDIM eq. 16 in DDIMScheduler's order: (1 - abar') / (1 - abar) (1 - abar / abar').
        ab, beta = self.alpha2_sigma2(t)
        ab_n, beta_n = self.alpha2_sigma2(t_next)
        return (beta_n / beta) * (1 - ab / ab_n)

    # -- parameterisations ----------------------------------------------------------------------
    def target(self, x0, eps, t):
        if self.prediction == "epsilon":
            return eps
        a, s = self.alpha_sigma(t)
        return _bcast(a, x0).to(x0.dtype) * eps - _bcast(s, x0).to(x0.dtype) * x0

    def x0_eps(self, x, out, t):
        a, s = self.alpha_sigma(t)
        a, s = _bcast(a, x).to(x.dtype), _bcast(s, x).to(x.dtype)
        if self.prediction == "epsilon":
            return (x - s * out) / a, out
        return a * x - s * out, s * x + a * out

    def ode_velocity(self, x, out, t):
        ab, slope = self.abar(t)
        # d sqrt(abar)/dt and d sqrt(1 - abar)/dt; the clamp keeps t = 0 (abar = 1, sigma = 0) finite.
        da = (slope / (2 * ab.sqrt())).to(x.dtype)
        ds = (-slope / (2 * (1 - ab).clamp_min(1e-12).sqrt())).to(x.dtype)
        x0, eps = self.x0_eps(x, out, t)
        return _bcast(da, x) * x0 + _bcast(ds, x) * eps

    def elbo_weight(self, t):
        ab, slope = self.abar(t)
        minus_dsnr = -slope / (1 - ab).clamp_min(1e-12) ** 2  # SNR = abar / (1 - abar)
        # d x0_hat / d out: -sigma / alpha for epsilon, -sigma for v.
        scale2 = (1 - ab) / ab if self.prediction == "epsilon" else (1 - ab)
        return (0.5 * minus_dsnr * scale2).to(torch.as_tensor(t).dtype)

    # -- DDIM timesteps -------------------------------------------------------------------------
    def timesteps(self, steps: int) -> torch.Tensor:
        """[steps] DDIMScheduler.set_timesteps(steps).timesteps (leading or trailing spacing)."""
        n = self.num_train_timesteps
        if not 1 <= steps <= n:
            raise UserError(f"sampler.steps={steps}: DDIM needs 1 <= steps <= num_train_timesteps; valid: 1 to {n}")
        if self.timestep_spacing == "leading":
            ts = torch.arange(steps, dtype=torch.float64).mul(n // steps).flip(0) + self.steps_offset
        else:
            ts = torch.arange(n, 0, -n / steps, dtype=torch.float64).round() - 1
        return ts.long()

    def schedule(self, steps, shift=1.0, grid="linspace"):
        # `grid` names the flow grids; a VP model's grid is DDIMScheduler's timesteps.
        if float(shift) != 1.0:
            raise UserError(f"sampler.shift={shift}: the timestep shift is a flow-matching option; "
                            "VP models take DDIM's timesteps; valid: 1.0")
        ts = self.timesteps(steps)
        ratio = self.num_train_timesteps // steps
        # DDIMScheduler.step goes from timestep k to k - N // steps (alphas_cumprod there, or the final value
        # below zero); the grid must be those steps for the rollout to be the scheduler's.
        prev = ts - ratio
        if steps > 1 and not torch.equal(prev[:-1], ts[1:]):
            raise UserError(f"sampler.steps={steps}: with {self.timestep_spacing} spacing DDIM's steps are not "
                            f"{ratio} timesteps apart; valid: a divisor of {self.num_train_timesteps}")
        last = float(prev[-1] + 1) if prev[-1] >= 0 else (0.0 if self.set_alpha_to_one else 1.0)
        times = torch.cat([(ts + 1).double(), torch.tensor([last], dtype=torch.float64)]) / self.num_train_timesteps
        return times.float()

    def model_time(self, t):
        return (self._steps(t) - 1).to(torch.float32)


FLOW = FlowMatching()


def require_flow(family: ModelFamily, part: str, alternative: str) -> None:
    """A one-line UserError when a part written in flow time and velocity meets another family's model."""
    if family.name != "flow":
        raise UserError(f"{part} is written for flow-matching models and this world's model is '{family.name}' "
                        f"({family.prediction}); valid on it: {alternative}")
