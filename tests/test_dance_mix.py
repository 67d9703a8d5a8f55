"""DanceGRPO and MixGRPO samplers, their kernels and solvers, DDPO's stat tracking, sibling-preserving minibatches."""
from __future__ import annotations

import math

import pytest
import torch

from bench.runner.config import compose_config
from bench.core.errors import UserError
from bench.core.meter import ComputeMeter
from bench.core.policy import PolicyCall
from bench.training.train import minibatch_indices
from bench.worlds.digits_model import DigitsFlowMLP
from objectives.group_advantage import GroupAdvantage, PromptStatTracker
from samplers.dance import DanceSampler
from samplers.kernels import DanceSDE
from samplers.mix import MixSampler
from samplers.rollout import ODE, SDE
from samplers.schedule import flow_schedule
from samplers.solvers import ode_solver
from samplers.window import WindowSchedule


@pytest.fixture(scope="module")
def model() -> PolicyCall:
    torch.manual_seed(0)
    return PolicyCall(DigitsFlowMLP(hidden=32, depth=2), ComputeMeter())


def rollout_of(sampler, model: PolicyCall, prompts: int = 3, group: int = 4, iteration: int = 1, seed: int = 0):
    model.meter.start_iteration()
    with model.meter.phase("rollout"), torch.no_grad():
        r = sampler.sample(model, ["p"] * prompts, torch.arange(prompts), group, (64,), torch.Generator().manual_seed(seed), iteration)
    return r, model.meter.current.rollout_forwards


def test_progressive_window_per_iteration():
    w = WindowSchedule({"schedule": "progressive", "start": 0, "stride": 1, "every": 2}, steps=10, width=4)
    # moves one step every 2 iterations, held at the last start 10 - 4 = 6
    assert [w.start(i) for i in range(1, 17)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 6, 6]
    back = WindowSchedule({"schedule": "progressive", "start": 1, "stride": 2, "every": 1, "roll_back": True}, 10, 4)
    assert [back.start(i) for i in range(1, 8)] == [1, 3, 5, 1, 3, 5, 1]
    no_overlap = WindowSchedule({"schedule": "progressive", "stride": 4, "every": 3}, 12, 4)
    assert [no_overlap.start(i) for i in (1, 3, 4, 7, 10)] == [0, 0, 4, 8, 8]


def test_random_and_fixed_window():
    w = WindowSchedule({"schedule": "random", "range": [2, 5]}, 10, 3)
    g = torch.Generator().manual_seed(0)
    starts = [w.start(i, g) for i in range(200)]
    assert set(starts) == {2, 3, 4, 5}
    g2 = torch.Generator().manual_seed(0)
    assert starts == [w.start(i, g2) for i in range(200)]  # seeded
    assert WindowSchedule({"schedule": "fixed", "start": 3}, 10, 3).start(99) == 3
    with pytest.raises(UserError):
        WindowSchedule({"range": [0, 8]}, 10, 3)


def test_mix_rollout_follows_window(model):
    sampler = MixSampler({"steps": 10, "window": {"size": 4, "schedule": "progressive", "every": 2}})
    for iteration, start in [(1, 0), (4, 1), (9, 4), (30, 6)]:
        r, nfe = rollout_of(sampler, model, iteration=iteration)
        sde_steps = r.step[r.kind == SDE].unique().tolist()
        assert sde_steps == [s + 1 for s in range(start, start + 4)]  # a node's step is its edge's end
        assert r.trained[r.kind == SDE].all() and not r.trained[r.kind == ODE].any()
        assert nfe == 12 * 10


def test_mix_flash_compresses_and_counts_heun(model):
    flash = MixSampler({"steps": 10, "window": {"size": 4, "schedule": "fixed", "start": 1},
                        "post_solver": "dpmpp_2m", "post_compress": 0.4})
    r, nfe = rollout_of(flash, model)
    # steps 0..4 as before, then round(0.4 * 5) = 2 post-window steps on a re-spaced grid ending at 0
    assert len(r.schedule) == 8 and r.schedule[-1] == 0 and torch.equal(r.schedule[:6], flow_schedule(10)[:6])
    assert nfe == 12 * 7
    heun = MixSampler({"steps": 10, "window": {"size": 4, "schedule": "fixed", "start": 1}, "post_solver": "heun"})
    _, nfe = rollout_of(heun, model)
    assert nfe == 12 * (10 + 5)  # Heun's corrector evaluates once more on each of the 5 post-window steps


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor, s2: float = 0.25) -> torch.Tensor:
    """Exact velocity for data N(0, s2 I): x_t has variance (1 - t)^2 s2 + t^2, and v = x d/dt log sd(t)."""
    t = t.view(-1, 1)
    return x * (t - (1 - t) * s2) / ((1 - t) ** 2 * s2 + t**2)


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m"])
def test_second_order_solvers_beat_euler(name):
    class Exact:
        def __call__(self, x, t, cond):
            return gaussian_velocity(x, t)

    # End at t = 0.2: DPM-Solver++'s step into t = 0 is first order by construction (it returns x0_hat).
    sched = torch.linspace(1.0, 0.2, 7, dtype=torch.float64)
    x1 = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def solve(solver_name: str) -> torch.Tensor:
        solver, x = ode_solver(solver_name), x1.clone()
        for i in range(6):
            x = solver.step(Exact(), x, gaussian_velocity(x, sched[i].expand(16)), i, sched, None)
        return x

    exact = x1 * math.sqrt(0.8**2 * 0.25 + 0.2**2)  # the ODE scales x by sd(0.2) / sd(1)
    err_euler, err = (solve("euler") - exact).abs().max(), (solve(name) - exact).abs().max()
    assert err < 0.5 * err_euler


def test_dpm_first_order_step_is_euler():
    sched = flow_schedule(4)
    x, v = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.allclose(ode_solver("dpmpp_2m").step(None, x, v, 1, sched, None), x + (sched[2] - sched[1]) * v, atol=1e-6)


def test_dance_sde_mean_by_hand():
    x, v = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 1.0]])
    sigma, nxt = torch.tensor([0.6]), torch.tensor([0.4])
    mu, s = DanceSDE(eta=0.3).mean_scale(x, v, sigma, nxt)
    # x0_hat = x - 0.6 v = (0.7, -2.6); score = -(x - 0.4 x0_hat) / 0.36 = (-1.9999.., 2.6666..)
    # mu = x - 0.2 v + 0.5 * 0.09 * score * 0.2
    score = [-(1.0 - 0.4 * 0.7) / 0.36, -(-2.0 + 0.4 * 2.6) / 0.36]
    expected = [1.0 - 0.1 + 0.009 * score[0], -2.0 - 0.2 + 0.009 * score[1]]
    assert mu[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert s.item() == pytest.approx(0.3 * math.sqrt(0.2), abs=1e-7)


def test_dance_groups_share_initial_noise_and_train_sixty_percent(model):
    r, _ = rollout_of(DanceSampler({"steps": 10}), model, prompts=3, group=4)
    roots = r.x[r.step == 0].view(3, 4, 64)
    assert torch.equal(roots[:, :1].expand_as(roots), roots)  # one noise per group ...
    assert not torch.equal(roots[0, 0], roots[1, 0])           # ... different across groups
    assert not torch.equal(r.x0[0], r.x0[1])                   # the SDE still spreads the group
    trained_per_chain = r.trained.view(11, 12)[1:].sum(0)     # nodes are stored level by level
    assert (trained_per_chain == 6).all()
    assert r.trained.view(11, 12)[1:].float().std(1).sum() > 0  # subsets differ between chains


def test_ddpo_stat_tracking_by_hand():
    tracker = PromptStatTracker(buffer_size=3, min_count=3)
    r1 = torch.tensor([1.0, 3.0, 10.0])
    # fewer than 3 rewards buffered per prompt: the batch's mean and std stand in
    adv1 = tracker.normalise(r1, ["a", "a", "b"], eps=0.0)
    assert adv1.tolist() == pytest.approx(((r1 - r1.mean()) / r1.std(unbiased=False)).tolist())
    r2 = torch.tensor([5.0, 7.0])
    # prompt a's buffer of 3 held (1, 3); adding 5, 7 pushes out 1 -> (3, 5, 7): mean 5, std sqrt(8/3)
    adv2 = tracker.normalise(r2, ["a", "a"], eps=0.0)
    assert list(tracker.buffers["a"]) == [3.0, 5.0, 7.0]
    assert adv2.tolist() == pytest.approx([0.0, 2 / math.sqrt(8 / 3)])
    restored = PromptStatTracker(3, 3)
    restored.load_state_dict(tracker.state_dict())
    assert list(restored.buffers["a"]) == [3.0, 5.0, 7.0]


def test_group_advantage_state_round_trip():
    adv = GroupAdvantage({"stat_tracking": {"buffer_size": 4, "min_count": 2}})
    adv.tracker.normalise(torch.tensor([1.0, 2.0]), ["x", "x"])
    fresh = GroupAdvantage({"stat_tracking": {"buffer_size": 4, "min_count": 2}})
    fresh.load_state_dict(adv.state_dict())
    assert list(fresh.tracker.buffers["x"]) == [1.0, 2.0]
    assert GroupAdvantage({}).state_dict() == {}


def test_minibatches_keep_siblings_together():
    groups = torch.tensor([5, 5, 5, 9, 9, 9, 2, 2, 2, 7, 7, 7])
    mbs = minibatch_indices(12, 2, torch.Generator().manual_seed(0), groups)
    assert sorted(torch.cat(mbs).tolist()) == list(range(12)) and len(mbs) == 2
    for mb in mbs:
        for g in groups[mb].unique():
            assert set(mb.tolist()) >= set((groups == g).nonzero().squeeze(1).tolist())


@pytest.mark.parametrize("method,sampler,estimator,objective,advantage", [
    ("ddpo", "ddim", "stepwise", "grpo_clip", "group"), ("ddpo_flow", "flow_sde", "stepwise", "grpo_clip", "group"),
    ("flow_grpo", "flow_sde", "stepwise", "grpo_clip", "group"),
    ("dance_grpo", "dance", "stepwise", "grpo_clip", "group"), ("mix_grpo", "mix", "stepwise", "grpo_clip", "group"),
    ("tree_grpo", "tree", "stepwise", "grpo_clip", "tree"), ("elbo_epg", "ode", "elbo", "epg", "group")])
def test_method_presets_compose(method, sampler, estimator, objective, advantage):
    cfg = compose_config([f"method={method}"])
    assert (cfg.sampler.name, cfg.estimator.name, cfg.objective.name, cfg.advantage.name) == (sampler, estimator, objective, advantage)
    assert cfg.preset == method
    # an explicit override crosses factors: the preset's other choices stay
    crossed = compose_config([f"method={method}", "estimator=elbo"])
    assert crossed.estimator.name == "elbo" and crossed.sampler.name == sampler
