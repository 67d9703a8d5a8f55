"""Samplers: the Flow-SDE step against its closed form, and the Rollout structure of chains."""
from __future__ import annotations

import math

import numpy as np
import torch

from bench.core.policy import PolicyCall
from samplers import SAMPLERS
from samplers.kernels import FlowSDE
from samplers.rollout import ODE, ROOT, SDE
from samplers.schedule import flow_schedule


def test_flow_sde_step_matches_closed_form_in_float64():
    g = torch.Generator().manual_seed(0)
    sched = flow_schedule(10, shift=3.0)
    kernel = FlowSDE(noise_level=0.7)
    x = torch.randn(5, 64, generator=g)
    v = torch.randn(5, 64, generator=g)
    for i in range(10):
        sigma, nxt = sched[i].expand(5), sched[i + 1].expand(5)
        mu, s = kernel.mean_scale(x, v, sigma, nxt, sched)
        # The closed form written out in numpy float64, independently of the torch code.
        sg, sn = float(sched[i]), float(sched[i + 1])
        denom = 1 - (float(sched[1]) if sg >= 1 else sg)
        std = 0.7 * math.sqrt(sg / denom)
        dt = sn - sg
        xn, vn = x.double().numpy(), v.double().numpy()
        mu_ref = xn + dt * (vn + std**2 / (2 * sg) * (xn + (1 - sg) * vn))
        np.testing.assert_allclose(mu.double().numpy(), mu_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s.numpy(), np.full(5, std * math.sqrt(-dt)), rtol=1e-6)


def test_schedule_shift_endpoints_and_formula():
    s = flow_schedule(4, shift=3.0)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    torch.testing.assert_close(s, 3 * t / (1 + 2 * t))
    assert s[0] == 1.0 and s[-1] == 0.0


def _sample(name, policy, meter, group=3, **cfg):
    sampler = SAMPLERS.get(name)({"steps": 5, **cfg})
    model = PolicyCall(policy, meter)
    with meter.phase("rollout"), torch.no_grad():
        return sampler.sample(model, ["a", "b"], torch.tensor([3, 7]), group, (64,), torch.Generator().manual_seed(1))


def test_chain_rollout_structure(tiny_policy, meter):
    r = _sample("flow_sde", tiny_policy, meter)
    B, T = 6, 5
    assert r.num_nodes == B * (T + 1) and len(r.leaves) == B
    assert (r.kind[:B] == ROOT).all() and (r.kind[B:] == SDE).all()
    assert (r.parent[B:] == torch.arange(B * T)).all()  # step-major chains
    assert r.leaf_slot.tolist() == [0, 0, 0, 1, 1, 1]
    assert meter.current.rollout_forwards == B * T
    ode = _sample("ode", tiny_policy, meter)
    assert (ode.kind[B:] == ODE).all() and len(ode.sde_edges()) == 0


def test_sde_window_and_train_fraction(tiny_policy, meter):
    r = _sample("flow_sde", tiny_policy, meter, sde_window=[1, 3])
    kinds = r.kind.view(6, 6)[1:, 0].tolist()  # edges into steps 1..5 of chain 0
    assert kinds == [ODE, SDE, SDE, ODE, ODE]
    r = _sample("flow_sde", tiny_policy, meter, train_fraction=0.4)
    trained_per_chain = r.trained.view(6, 6).sum(0)
    assert trained_per_chain.tolist() == [2] * 6  # round(0.4 * 5) steps per chain


def test_same_seed_same_rollout(tiny_policy, meter):
    a, b = _sample("flow_sde", tiny_policy, meter), _sample("flow_sde", tiny_policy, meter)
    assert torch.equal(a.x, b.x) and torch.equal(a.logp_old, b.logp_old)
