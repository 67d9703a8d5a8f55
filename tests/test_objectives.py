"""Objectives and group advantages against hand-derived values."""
from __future__ import annotations

import torch

from objectives import ADVANTAGES, OBJECTIVES
from objectives.group_advantage import normalise_groups


def _grad(name, logp_vals, logp_old_vals, adv_vals, **cfg):
    logp = torch.tensor(logp_vals, requires_grad=True)
    loss, stats = OBJECTIVES.get(name)(cfg).loss(logp, torch.tensor(logp_old_vals), torch.tensor(adv_vals))
    loss.backward()
    return logp.grad, loss, stats


def test_grpo_clip_zero_gradient_outside_clip_region():
    eps = 0.2
    lr = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.9, 1.5, 0.5]))
    adv = [1.0, -1.0, 1.0, -1.0, -1.0, 1.0]
    grad, loss, stats = _grad("grpo_clip", lr.tolist(), [0.0] * 6, adv, clip_range=eps)
    # Units 0, 1: ratio beyond the clip on the side the advantage pushes -> the clipped branch is the max, no gradient.
    assert grad[0] == 0 and grad[1] == 0
    # Units 2-5: the unclipped branch is the max -> d/dlogp (-A r) / N = -A r / 6.
    r = lr.exp()
    for i in (2, 3, 4, 5):
        torch.testing.assert_close(grad[i], -adv[i] * r[i] / 6)
    expected = (-1.2 + 0.8 - 1.1 + 0.9 + 1.5 - 0.5) / 6
    torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert abs(stats["clip_frac"] - 4 / 6) < 1e-6  # units 0, 1, 4, 5 lie outside [0.8, 1.2]


def test_epg_pepg_reinforce_gradients_by_hand():
    logp, old, adv = [-1.0, -2.0], [-1.5, -1.0], [2.0, -1.0]
    rho = torch.exp(torch.tensor(logp) - torch.tensor(old))
    g, _, _ = _grad("epg", logp, old, adv)
    torch.testing.assert_close(g, -rho * torch.tensor(adv) / 2)
    g, _, _ = _grad("pepg", logp, old, adv)
    torch.testing.assert_close(g, -rho * (torch.tensor(adv) - torch.log(rho)) / 2)
    g, _, _ = _grad("reinforce", logp, old, adv)
    torch.testing.assert_close(g, -torch.tensor(adv) / 2)


def test_group_normalisation_by_hand():
    r = torch.tensor([1.0, 3.0, 0.0, 0.0, 10.0, 20.0])
    g = torch.tensor([0, 0, 1, 1, 2, 2])
    a = normalise_groups(r, g, eps=0.0 + 1e-12)
    torch.testing.assert_close(a, torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, 1.0]))
    a = normalise_groups(r, g, global_std=True, eps=0.0)
    std = r.std(unbiased=False)
    torch.testing.assert_close(a, torch.tensor([-1.0, 1.0, 0.0, 0.0, -5.0, 5.0]) / std)


def test_group_advantage_clips_and_copies_to_chain_nodes(tiny_policy, meter):
    from bench.core.policy import PolicyCall
    from samplers import SAMPLERS

    with meter.phase("rollout"), torch.no_grad():
        r = SAMPLERS.get("flow_sde")({"steps": 3}).sample(PolicyCall(tiny_policy, meter), ["a"], torch.tensor([2]), 4,
                                                           (64,), torch.Generator().manual_seed(0))
    r.reward = torch.tensor([0.0, 0.0, 0.0, 1.0])
    adv = ADVANTAGES.get("group")({"clip": 1.5, "std_eps": 0.0})(r)
    # leaf advantages: (r - 0.25) / 0.433 = [-0.577, -0.577, -0.577, 1.732] -> clipped at 1.5
    expected_leaf = torch.tensor([-1 / 3**0.5] * 3 + [1.5])
    torch.testing.assert_close(adv[r.leaves], expected_leaf, rtol=1e-5, atol=1e-5)
    for step in range(4):  # every node of chain b carries its leaf's advantage
        torch.testing.assert_close(adv[step * 4:(step + 1) * 4], expected_leaf, rtol=1e-5, atol=1e-5)
