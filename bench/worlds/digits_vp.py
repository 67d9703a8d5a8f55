"""The digits world with a VP epsilon-prediction model (DDPM, Ho et al. 2020): DDPO's setting in miniature."""
from __future__ import annotations

from bench.core.families import BETA_SCHEDULES, PREDICTIONS, SPACINGS, VariancePreserving
from bench.core.schema import Option
from bench.worlds import WORLDS
from bench.worlds.digits import DigitsWorld

# SD1.5's scheduler config (DDPO's model), so digits_vp and sd15 share one noise schedule and DDIM grid.
VP_OPTIONS = {
    "num_train_timesteps": Option(1000, int, low=2, help="N discrete training timesteps"),
    "beta_start": Option(0.00085, float, low=0, low_open=True),
    "beta_end": Option(0.012, float, low=0, low_open=True, high=1, high_open=True),
    "beta_schedule": Option("scaled_linear", str, choices=BETA_SCHEDULES),
    "prediction_type": Option("epsilon", str, choices=PREDICTIONS, help="what the network predicts"),
    "set_alpha_to_one": Option(False, bool, help="DDIM's last step lands on abar = 1 (else alphas_cumprod[0])"),
    "steps_offset": Option(1, int, low=0, help="DDIM leading-spacing offset (SD1.5: 1)"),
    "timestep_spacing": Option("leading", str, choices=SPACINGS),
}


@WORLDS.register("digits_vp")
class DigitsVPWorld(DigitsWorld):
    """digits with the same MLP, data, judges, prompts and eval, but a VP model: the network predicts eps
    (or v), x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, pretrained with the DDPM loss for the same steps and seed.

    Samplers see a VP family: `ode` and the eval run deterministic DDIM on DDIMScheduler's timesteps, `ddim`
    (eta 1) is DDPO's sampler; flow-only kernels (flow_sde, dance, cps) refuse it with a one-line error.
    """

    OPTIONS = {
        "shift": Option(1.0, float, low=1.0, high=1.0, help="flow time shift: not used by VP models"),
        "vp": Option({}, dict, fields=VP_OPTIONS, help="the diffusers scheduler config of the noise schedule"),
        "sde_kernel": Option("ddim", str, choices=("ddim",),
                             help="the SDE kernel tree and mix samplers default to here (experiments/sampler/)"),
    }
    name = "digits_vp"
    family_name = "vp"

    def model_family(self) -> VariancePreserving:
        return VariancePreserving.from_config(self.cfg.get("vp") or {})
