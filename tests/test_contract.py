"""The contract every registry entry keeps, as diffusers' SchedulerCommonTest does for its schedulers.

Parametrised over every registered sampler, estimator, objective, advantage, world and reward: each builds from
its declared defaults, returns the interface's shapes, gives a ratio of exactly 1 before any update where it has
one, is deterministic under a seed, and rejects a bad option value with a one-line `group.key=value: ...` error.
A new entry is picked up here without an edit (rewards and worlds name the options they need on a CPU below).
"""
from __future__ import annotations

import pytest
import torch

from bench.runner.config import compose_config
from bench.core.errors import UserError
from bench.core.meter import ComputeMeter
from bench.core.policy import PolicyCall
from bench.runner.resolve import resolve_cell
from bench.runner.components import build_world, incompatibility
from bench.rewards import REWARDS
from bench.core.schema import Option
from bench.worlds import WORLDS
from bench.worlds.digits_model import DigitsFlowMLP
from estimators import ESTIMATORS
from objectives import ADVANTAGES, OBJECTIVES
from samplers import SAMPLERS
from samplers.rollout import SDE

SHAPE = (64,)
PROMPTS = 3


def bad_value(opt: Option) -> object | None:
    """A value the option must refuse, or None if its type admits every value of its kind."""
    if opt.choices is not None:
        return "__not_a_choice__"
    if opt.type is bool:
        return "maybe"
    if opt.type in (int, float) and opt.low is not None:
        return opt.low - 1
    if opt.type in (int, float):
        return "abc"
    return None


def bad_options(cls) -> list[tuple[str, object]]:
    out = [(k, bad_value(o)) for k, o in cls.options().items()]
    return [(k, v) for k, v in out if v is not None]


def assert_one_line_refusal(build, group: str, key: str, value: object) -> None:
    with pytest.raises(UserError) as e:
        build()
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and msg.startswith(f"{group}.{key}="), msg
    assert "valid:" in msg, msg


@pytest.fixture
def model() -> PolicyCall:
    """A small digits flow MLP; calls outside rollouts count as training forwards."""
    torch.manual_seed(0)
    meter = ComputeMeter()
    with meter.phase("train"):
        yield PolicyCall(DigitsFlowMLP(hidden=32, depth=2).eval(), meter)


def rollout_of(sampler_name: str, model: PolicyCall, seed: int = 0, group: int = 4):
    sampler = SAMPLERS.get(sampler_name)({"name": sampler_name, "steps": 5})
    gen = torch.Generator().manual_seed(seed)
    cond = torch.arange(PROMPTS)
    with torch.no_grad(), model.meter.phase("rollout"):
        return sampler, sampler.sample(model, [f"p{i}" for i in range(PROMPTS)], cond, group, SHAPE, gen, 1)


# -- samplers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLERS.names())
def test_sampler_contract(name: str, model: PolicyCall) -> None:
    sampler, r = rollout_of(name, model)
    n_leaves = PROMPTS * sampler.samples_per_prompt(4)
    assert r.x0.shape == (n_leaves, *SHAPE) and r.leaf_slot.shape == (n_leaves,)
    assert r.x.shape[0] == r.t.shape[0] == r.parent.shape[0] == r.kind.shape[0] == r.num_nodes
    assert float(r.schedule[0]) == 1.0 and float(r.schedule[-1]) == 0.0
    sde = r.kind == SDE
    assert bool(sde.any()) == sampler.stochastic
    assert torch.isfinite(r.logp_old[sde]).all() and (r.scale[sde] > 0).all()
    assert torch.isfinite(r.x0).all()
    _, again = rollout_of(name, model)
    assert torch.equal(r.x, again.x) and torch.equal(r.logp_old, again.logp_old)
    _, other = rollout_of(name, model, seed=1)
    assert not torch.equal(r.x0, other.x0)


@pytest.mark.parametrize("name,key,value", [(n, k, v) for n in SAMPLERS.names()
                                            for k, v in bad_options(SAMPLERS.get(n))])
def test_sampler_refuses_bad_option(name: str, key: str, value: object) -> None:
    assert_one_line_refusal(lambda: SAMPLERS.get(name)({"name": name, key: value}), "sampler", key, value)


# -- estimators ------------------------------------------------------------------------------------
def sampler_for(estimator) -> str:
    return "flow_sde" if not estimator.final_sample else "ode"


@pytest.mark.parametrize("name", ESTIMATORS.names())
def test_estimator_contract(name: str, model: PolicyCall) -> None:
    est_cls = ESTIMATORS.get(name)
    est = est_cls({"name": name, **({"steps": 4} if name == "exact" else {})})
    sampler, r = rollout_of(sampler_for(est), model)
    units = est.units(r)
    gen = torch.Generator().manual_seed(0)
    draws = est.prepare(r, units, gen)
    out = est.estimate(model, r, units, draws)
    assert out.logp.shape == (len(units),) and torch.isfinite(out.logp).all()
    again = est.estimate(model, r, units, est.prepare(r, units, torch.Generator().manual_seed(0)))
    assert torch.equal(out.logp, again.logp)
    # Before any update the old policy is the current one: the ratio is exactly 1.
    params = {n: p.detach().clone() for n, p in model.policy.named_parameters()}
    old = est.old_logp(model.with_params(params), r, units, draws, gen, is_sampling_policy=False)
    assert torch.equal(torch.exp(out.logp.detach() - old), torch.ones(len(units)))


@pytest.mark.parametrize("name,key,value", [(n, k, v) for n in ESTIMATORS.names()
                                            for k, v in bad_options(ESTIMATORS.get(n))])
def test_estimator_refuses_bad_option(name: str, key: str, value: object) -> None:
    assert_one_line_refusal(lambda: ESTIMATORS.get(name)({"name": name, key: value}), "estimator", key, value)


def test_stepwise_on_an_ode_sampler_is_declared_incompatible() -> None:
    est = ESTIMATORS.get("stepwise")({"name": "stepwise"})
    assert "needs SDE edges" in est.incompatibility(SAMPLERS.get("ode")({"name": "ode"}))


# -- objectives ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_objective_contract(name: str, model: PolicyCall) -> None:
    obj = OBJECTIVES.get(name)({"name": name})
    est = ESTIMATORS.get("elbo")({"name": "elbo", "J": 2}) if obj.on_noised_samples \
        else ESTIMATORS.get("stepwise")({"name": "stepwise"})
    sampler, r = rollout_of(sampler_for(est), model)
    assert obj.incompatibility(sampler, est) is None
    units = est.units(r)
    adv = torch.linspace(-1, 1, len(units))
    draws = est.prepare(r, units, torch.Generator().manual_seed(0))
    out = est.estimate(model, r, units, draws)
    if obj.on_noised_samples:
        loss, stats = obj.sample_loss(out, r.x[units], adv, None)
    else:
        loss, stats = obj.loss(out.logp, out.logp.detach(), adv)
        assert stats["ratio_mean"] == 1.0 and stats["ratio_min"] == 1.0 and stats["ratio_max"] == 1.0
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.policy.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name,key,value", [(n, k, v) for n in OBJECTIVES.names()
                                            for k, v in bad_options(OBJECTIVES.get(n))])
def test_objective_refuses_bad_option(name: str, key: str, value: object) -> None:
    assert_one_line_refusal(lambda: OBJECTIVES.get(name)({"name": name, key: value}), "objective", key, value)


# -- advantages ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_advantage_contract(name: str, model: PolicyCall) -> None:
    adv_fn = ADVANTAGES.get(name)({"name": name})
    sampler, r = rollout_of("tree" if name == "tree" else "flow_sde", model)
    r.reward = torch.linspace(0, 1, len(r.leaves))
    adv = adv_fn(r)
    assert adv.shape == (r.num_nodes,) and torch.isfinite(adv).all()
    leaf = adv[r.leaves]
    for slot in range(PROMPTS):  # normalised per prompt: zero mean over the prompt's leaves
        assert abs(float(leaf[r.leaf_slot == slot].mean())) < 1e-5
    assert torch.equal(adv, ADVANTAGES.get(name)({"name": name})(r))


@pytest.mark.parametrize("name,key,value", [(n, k, v) for n in ADVANTAGES.names()
                                            for k, v in bad_options(ADVANTAGES.get(n))])
def test_advantage_refuses_bad_option(name: str, key: str, value: object) -> None:
    assert_one_line_refusal(lambda: ADVANTAGES.get(name)({"name": name, key: value}), "advantage", key, value)


def test_group_advantage_on_tree_edges_is_refused() -> None:
    """The group advantage gives each shared tree edge the advantage of one arbitrary leaf below it: refused for
    estimators that train on edges, allowed for final-sample estimators (leaves only)."""
    base = ["grid=smoke", "sampler=tree", "advantage=group"]
    stepwise = resolve_cell(compose_config([*base, "estimator=stepwise"]))
    assert "advantage 'group'" in incompatibility(stepwise)
    elbo = resolve_cell(compose_config([*base, "estimator=elbo"]))
    assert incompatibility(elbo) is None


# -- worlds ------------------------------------------------------------------------------------
def world_config(name: str, tmp_path, *extra: str):
    cls = WORLDS.get(name)  # CPU_OVERRIDES: the class's own (a subclass's config may already set them)
    return resolve_cell(compose_config(["grid=smoke", f"world={name}", f"results_dir={tmp_path}",
                                        *vars(cls).get("CPU_OVERRIDES", ()), *extra]))


@pytest.mark.parametrize("name", WORLDS.names())
def test_world_contract(name: str, tmp_path) -> None:
    cfg = world_config(name, tmp_path)
    world = build_world(cfg)
    prompts = world.train_prompts()[:2]
    assert prompts and all(isinstance(p, str) for p in prompts)
    policy = world.build_policy()
    assert not policy.training, "the policy is built in eval mode (dropout off, deterministic)"
    trainable = policy.trainable_named_parameters()
    assert trainable and all(p.requires_grad for p in trainable.values())
    x = torch.randn((2, *world.latent_shape), generator=torch.Generator().manual_seed(0)).to(world.device)
    t = torch.tensor([0.9, 0.3], device=world.device)
    with torch.no_grad():
        v = policy.velocity(x, t, world.encode(prompts))
        again = build_world(cfg).build_policy().velocity(x, t, world.encode(prompts))
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert torch.equal(v, again), "a world built twice from one config gives the same policy"
    images = world.decode(x)
    assert images.ndim == 4 and images.shape[0] == 2 and float(images.min()) >= 0 and float(images.max()) <= 1


@pytest.mark.parametrize("name", WORLDS.names())
def test_world_refuses_bad_option(name: str, tmp_path) -> None:
    cls = WORLDS.get(name)
    key, value = next((k, v) for k, v in bad_options(cls) if k not in ("device",))
    with pytest.raises(UserError) as e:
        world_config(name, tmp_path, f"world.{key}={value}")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and msg.startswith(f"world.{key}=") and "valid:" in msg, msg


# -- rewards ------------------------------------------------------------------------------------
# What each reward needs to build on a CPU without weights: (world, world overrides, reward options).
REWARD_CASES = {
    "digit_judge": ("digits", [], {}),
    "ink": ("digits", [], {}),
    "jpeg": ("digits", [], {"quality": 95}),
    "pickscore": ("sd3", [], {"tiny": True}),
    "clipscore": ("sd3", [], {"tiny": True}),
    "aesthetic": ("sd3", [], {"tiny": True}),
    "geneval": ("sd3", ["world.prompts.train=geneval_style.jsonl"], {"detector": {"tiny": True}, "color_tiny": True}),
    "geneval_mini": ("shapes", [], {}),
}
# Rewards whose packages are optional extras that cannot be installed on a CPU-only torch: they must refuse
# with one line naming the extra.
OPTIONAL_EXTRAS = {"hpsv2": "gpu-rewards", "imagereward": "gpu-rewards"}


def test_every_reward_has_a_contract_case() -> None:
    missing = set(REWARDS.names()) - set(REWARD_CASES) - set(OPTIONAL_EXTRAS)
    assert not missing, f"add a CPU contract case for {sorted(missing)} to REWARD_CASES"


@pytest.mark.parametrize("name", sorted(REWARD_CASES))
def test_reward_contract(name: str, tmp_path) -> None:
    world_name, overrides, options = REWARD_CASES[name]
    world = build_world(world_config(world_name, tmp_path, *overrides))
    reward = REWARDS.get(name)(world, options)
    prompts = world.train_prompts()[:3]
    images = torch.rand((3, *world.decode(torch.zeros((1, *world.latent_shape))).shape[1:]),
                        generator=torch.Generator().manual_seed(0))
    scores = reward(images, prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert torch.equal(scores, reward(images, prompts))


@pytest.mark.parametrize("name", sorted(OPTIONAL_EXTRAS))
def test_optional_extra_reward_refuses_in_one_line(name: str, tmp_path) -> None:
    world = build_world(world_config("sd3", tmp_path))
    with pytest.raises(UserError) as e:
        REWARDS.get(name)(world, {})
    assert len(str(e.value).splitlines()) == 1 and OPTIONAL_EXTRAS[name] in str(e.value), str(e.value)
