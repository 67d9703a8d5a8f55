"""TreeGRPO: tree rollouts (NFE count, shared prefixes), tree advantages by hand, one forward per parent in training."""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench.runner.config import compose_config
from bench.core.meter import ComputeMeter
from bench.core.policy import PolicyCall
from bench.worlds.digits_model import DigitsFlowMLP
from objectives.grpo_clip import GRPOClip
from objectives.tree_advantage import TreeAdvantage
from samplers.kernels import FlowSDE
from samplers.ode import ODESampler
from samplers.rollout import SDE, RolloutBuilder
from samplers.schedule import flow_schedule
from samplers.tree import TreeSampler, tree_nfe


@pytest.fixture(scope="module")
def model() -> PolicyCall:
    torch.manual_seed(0)
    return PolicyCall(DigitsFlowMLP(hidden=32, depth=2), ComputeMeter())


def sample_tree(model: PolicyCall, k: int, d: int, s: int, steps: int, prompts: int = 2, group_size: int = 1, seed: int = 0):
    sampler = TreeSampler({"steps": steps, "branches": k, "depth": d, "window": {"schedule": "fixed", "start": s}})
    model.meter.start_iteration()
    with model.meter.phase("rollout"), torch.no_grad():
        rollout = sampler.sample(model, ["p"] * prompts, torch.arange(prompts), group_size, (64,),
                                 torch.Generator().manual_seed(seed))
    return sampler, rollout, model.meter.current.rollout_forwards


@pytest.mark.parametrize("k,d,s,steps", [(3, 3, 0, 10), (3, 3, 4, 10), (3, 3, 7, 10), (2, 2, 1, 5), (2, 4, 3, 8), (4, 1, 2, 6)])
def test_rollout_nfe_matches_formula(model, k, d, s, steps):
    prompts, roots = 2, 2
    _, rollout, nfe = sample_tree(model, k, d, s, steps, prompts, group_size=roots * k**d)
    per_root = s + sum(k**j for j in range(d)) + k**d * (steps - s - d)
    assert per_root == tree_nfe(k, d, s, steps)
    assert nfe == prompts * roots * per_root
    assert len(rollout.leaves) == prompts * roots * k**d
    assert int((rollout.kind == SDE).sum()) == prompts * roots * sum(k**j for j in range(1, d + 1))


def test_samples_per_prompt_rounds_to_whole_roots():
    sampler = TreeSampler({"steps": 10, "branches": 3, "depth": 3})
    assert [sampler.samples_per_prompt(g) for g in (1, 8, 27, 53, 54)] == [27, 27, 27, 27, 54]


def test_leaves_distinct_and_share_prefix_bit_for_bit(model):
    k, d, s, steps = 3, 2, 3, 7
    _, rollout, _ = sample_tree(model, k, d, s, steps, prompts=2, group_size=k**d)
    x0 = rollout.x0
    assert torch.cdist(x0, x0).add(torch.eye(len(x0))).min() > 0  # every leaf differs from every other
    # Walk each leaf up to the window start: all leaves of a root reach one node.
    node = rollout.leaves.clone()
    for _ in range(steps - s):
        node = rollout.parent[node]
    assert (rollout.step[node] == s).all()
    assert node.view(2, k**d).unique(dim=1).shape[1] == 1 and node[0] != node[-1]
    # That shared prefix is the ODE trajectory of the root noise, bit for bit (same batch, same generator).
    ode = ODESampler({"steps": steps})
    with model.meter.phase("rollout"), torch.no_grad():
        ref = ode.sample(model, ["p"] * 2, torch.arange(2), 1, (64,), torch.Generator().manual_seed(0))
    assert torch.equal(rollout.x[node[[0, -1]]], ref.x[ref.step == s])
    # The k children of one parent share the mean (one evaluation) and differ by their noise.
    first = ((rollout.step == s + 1) & (rollout.kind == SDE)).nonzero().squeeze(1)[:k]
    assert rollout.parent[first].unique().numel() == 1
    assert torch.equal(rollout.mean[first[0]], rollout.mean[first[1]]) and not torch.equal(rollout.x[first[0]], rollout.x[first[1]])


def binary_tree(logp_level1: list[float], logp_level2: list[float], rewards: list[float]):
    """root -> a, b (SDE) -> a1, a2, b1, b2 (SDE leaves), 1-dim nodes so log-prob 'mean' and 'sum' agree."""
    sched = flow_schedule(2)
    b = RolloutBuilder(sched, ["p"], torch.zeros(1, dtype=torch.long), FlowSDE(), 1.0)
    root = b.add(torch.zeros(1, 1), 0, torch.zeros(1, dtype=torch.long))
    mid = b.add(torch.zeros(2, 1), 1, torch.zeros(2, dtype=torch.long), root.repeat(2), SDE,
                torch.zeros(2, 1), torch.ones(2), torch.tensor(logp_level1), True)
    leaves = b.add(torch.zeros(4, 1), 2, torch.zeros(4, dtype=torch.long), mid.repeat_interleave(2), SDE,
                   torch.zeros(4, 1), torch.ones(4), torch.tensor(logp_level2), True)
    rollout = b.build(leaves)
    rollout.reward = torch.tensor(rewards)
    return rollout


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_tree_advantage_by_hand(alpha):
    # rewards 1, 2, 3, 6: mean 3, population std sqrt(3.5); leaf advantages (-2, -1, 0, 3) / (sqrt(3.5) + 1e-4)
    rollout = binary_tree([math.log(3), 0.0], [0.0, math.log(4), math.log(2), math.log(2)], [1.0, 2.0, 3.0, 6.0])
    c = 1 / (math.sqrt(3.5) + 1e-4)
    if alpha == 0:
        # plain means: a = (-2 - 1) / 2, b = (0 + 3) / 2, root = (a + b) / 2
        expected = [0.0, -1.5 * c, 1.5 * c]
    else:
        # weights e^logp normalised over siblings: a's children 1/5, 4/5; b's 1/2, 1/2; root's children 3/4, 1/4
        a, b_ = (-2 / 5 - 4 / 5) * c, 1.5 * c
        expected = [0.75 * a + 0.25 * b_, a, b_]
    adv = TreeAdvantage({"alpha": alpha, "logp_reduce": "sum"})(rollout)
    assert adv.tolist() == pytest.approx(expected + [-2 * c, -1 * c, 0.0, 3 * c], abs=1e-6)


def test_tree_advantage_passes_single_child_links_through():
    # An ODE tail below each window leaf (single child) must not change the value: compare a chain of two.
    rollout = binary_tree([0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0])
    adv = TreeAdvantage({"alpha": 1.0})(rollout)
    assert adv[0].item() == pytest.approx(0.0, abs=1e-6)
    assert adv[1].item() == pytest.approx(adv[3:5].mean().item(), abs=1e-6)


def test_training_on_tree_one_forward_per_parent_and_ratio_one(tmp_path, monkeypatch):
    ratios: list[torch.Tensor] = []
    original = GRPOClip.loss

    def recording_loss(self, logp, logp_old, adv):
        ratios.append(torch.exp(logp - logp_old).detach())
        return original(self, logp, logp_old, adv)

    monkeypatch.setattr(GRPOClip, "loss", recording_loss)
    cfg = compose_config(["method=tree_grpo", f"results_dir={tmp_path}", "budget.iterations=1",
                          "train.prompts_per_iter=2", "train.group_size=27", "train.minibatches=2",
                          "sampler.window.schedule=fixed", "sampler.window.start=2",
                          "world.eval.samples_per_class=2"])
    from bench.training.train import train_cell

    train_cell(cfg, tmp_path / "cell")
    row = [json.loads(line) for line in (tmp_path / "cell" / "metrics.jsonl").read_text().splitlines()][1]
    parents = 2 * (1 + 3 + 9)  # 2 roots; window levels hold 1, 3, 9 parents per root
    assert row["train_forwards"] == parents and row["train_backwards"] == parents
    assert row["rollout_forwards"] == 2 * tree_nfe(3, 3, 2, 10)
    assert row["num_units"] == 2 * (3 + 9 + 27)
    assert len(ratios) == 2 and sum(len(r) for r in ratios) == row["num_units"]
    assert torch.equal(ratios[0], torch.ones_like(ratios[0]))  # before the first update: exactly 1
