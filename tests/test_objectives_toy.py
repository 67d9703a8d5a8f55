"""Every objective's gradient on a two-sample toy against the hand-derived gradient; DiffusionNFT's beta limits."""
from __future__ import annotations

import pytest
import torch

from estimators.base import Estimate
from objectives import OBJECTIVES

# Log-ratio objectives: logp_theta is the parameter itself, so d loss / d logp is the whole gradient.
LOGP, OLD, ADV = [-1.0, -2.0], [-1.5, -1.0], [2.0, -1.0]


def _logp_grad(name: str, **cfg) -> torch.Tensor:
    logp = torch.tensor(LOGP, requires_grad=True)
    cls = OBJECTIVES.get(name)
    options = {k: v for k, v in cfg.items() if k in cls.options()}  # clip_range only where the objective has one
    loss, _ = cls(options).loss(logp, torch.tensor(OLD), torch.tensor(ADV))
    loss.backward()
    return logp.grad


def test_log_ratio_objectives_match_hand_gradients():
    # r = exp(logp - old) = [e^0.5, e^-1]; the mean over two units contributes 1/2.
    r = [torch.exp(torch.tensor(0.5)), torch.exp(torch.tensor(-1.0))]
    log_r = [0.5, -1.0]
    hand = {
        "reinforce": [-ADV[0] / 2, -ADV[1] / 2],
        "epg": [-r[0] * ADV[0] / 2, -r[1] * ADV[1] / 2],
        "pepg": [-r[0] * (ADV[0] - log_r[0]) / 2, -r[1] * (ADV[1] - log_r[1]) / 2],
        # d/dlogp 0.5 sg(r) (A - log r)^2 / 2 = -sg(r) (A - log r) / 2: PEPG's gradient.
        "par": [-r[0] * (ADV[0] - log_r[0]) / 2, -r[1] * (ADV[1] - log_r[1]) / 2],
        # clip 0.2: r0 = 1.65 > 1.2 with A > 0 -> clipped branch, no gradient; r1 = 0.37 < 0.8 with A < 0: same.
        "grpo_clip": [0.0, 0.0],
    }
    for name, expected in hand.items():
        torch.testing.assert_close(_logp_grad(name, clip_range=0.2), torch.tensor(expected, dtype=torch.float32),
                                   msg=name)
    # Inside the clip range grpo_clip is -A r / N.
    torch.testing.assert_close(_logp_grad("grpo_clip", clip_range=10.0),
                               torch.tensor([-r[0] * ADV[0] / 2, -r[1] * ADV[1] / 2]))


def test_par_loss_value_by_hand():
    loss, _ = OBJECTIVES.get("par")({}).loss(torch.tensor(LOGP), torch.tensor(OLD), torch.tensor(ADV))
    r0, r1 = torch.exp(torch.tensor(0.5)), torch.exp(torch.tensor(-1.0))
    expected = (0.5 * r0 * (2.0 - 0.5) ** 2 + 0.5 * r1 * (-1.0 + 1.0) ** 2) / 2
    torch.testing.assert_close(loss, expected)


# Velocity objectives: two final samples in D = 2 dims, one noising each; v_theta is the parameter.
X0 = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
EPS = torch.tensor([[0.2, -0.4], [1.0, 1.0]], dtype=torch.float64)
T = torch.tensor([0.5, 0.25], dtype=torch.float64)
U = EPS - X0  # the flow-matching target
V_OLD = torch.tensor([[0.1, 0.0], [0.0, 0.4]], dtype=torch.float64)
V_THETA = [[0.3, 0.1], [-0.2, 0.5]]


def _velocity_grad(name: str, adv, v_theta=V_THETA, **cfg) -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.tensor(v_theta, dtype=torch.float64, requires_grad=True)
    x_t = (1 - T[:, None]) * X0 + T[:, None] * EPS
    est = Estimate(logp=torch.zeros(2), v=v, x_in=x_t, t_in=T, cond_in=None, unit_of_eval=torch.arange(2))
    model_old = lambda x, t, c: V_OLD  # noqa: E731 (stands in for a PolicyCall at the old parameters)
    loss, _ = OBJECTIVES.get(name)(cfg).sample_loss(est, X0, torch.tensor(adv, dtype=torch.float64), model_old)
    loss.backward()
    return v.grad, loss


def _adaptive_grad(w: torch.Tensor) -> torch.Tensor:
    """d/dw of t mean_d (u - w)^2 / sg(mean_d |u - w|) (DiffusionNFT's loss, x0_hat - x0 = t (u - w)), per sample."""
    m = (U - w).abs().mean(1, keepdim=True)
    return 2 * T[:, None] * (w - U) / (2 * m)


def test_awm_gradients_by_hand():
    adv = [1.5, -0.5]
    a = torch.tensor(adv, dtype=torch.float64)[:, None]
    v = torch.tensor(V_THETA, dtype=torch.float64)
    grad, _ = _velocity_grad("awm", adv, weighting="uniform")
    torch.testing.assert_close(grad, a * 2 * (v - U) / (2 * 2))       # mean over N=2 samples and D=2 dims
    grad, _ = _velocity_grad("awm", adv, weighting="t")
    torch.testing.assert_close(grad, a * T[:, None] * 2 * (v - U) / 4)
    grad, _ = _velocity_grad("awm", adv, weighting="adaptive")
    torch.testing.assert_close(grad, a * _adaptive_grad(v) / 2)


def test_nft_gradient_by_hand():
    beta, a_max = 0.5, 5.0
    adv = [2.0, -7.0]                       # the second is beyond A_max: r = 0, only the negative policy trains
    r = torch.tensor([2.0 / 10 + 0.5, 0.0], dtype=torch.float64)[:, None]
    v = torch.tensor(V_THETA, dtype=torch.float64)
    v_pos, v_neg = beta * v + (1 - beta) * V_OLD, (1 + beta) * V_OLD - beta * v
    grad, _ = _velocity_grad("nft", adv, beta=beta, adv_max=a_max)
    # loss = A_max / (N beta) sum_i r L(v+) + (1 - r) L(v-); dv+/dv = beta, dv-/dv = -beta.
    expected = a_max / 2 * (r * _adaptive_grad(v_pos) - (1 - r) * _adaptive_grad(v_neg))
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("beta", [0.3, 1.0])
def test_nft_equals_adaptive_awm_at_the_old_policy(beta):
    adv = [2.0, -7.0]
    grad, _ = _velocity_grad("nft", adv, v_theta=V_OLD.tolist(), beta=beta, adv_max=5.0)
    awm, _ = _velocity_grad("awm", [2.0, -5.0], v_theta=V_OLD.tolist(), weighting="adaptive")  # A clipped to A_max
    torch.testing.assert_close(grad, awm)


def test_nft_small_beta_limit_is_awm_at_old_velocities():
    # Away from the old policy, beta -> 0 freezes the direction at v_old: (1/N) clip(A) dL/dv |_{v_old}.
    adv = [2.0, -1.0]
    grad, loss = _velocity_grad("nft", adv, beta=1e-7, adv_max=5.0)
    expected = torch.tensor(adv, dtype=torch.float64)[:, None] * _adaptive_grad(V_OLD) / 2
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-8)
    assert loss.item() > 1e5  # the value itself diverges like A_max L(v_old) / beta
