"""train.micro_batch: gradient accumulation inside an optimizer step gives the whole minibatch's gradient."""
from __future__ import annotations

import pytest
import torch

from bench.runner.config import compose_config
from runner_helpers import digits_cache, results_dir  # noqa: F401 (a fixture)
from bench.training.micro_batch import StepStats, micro_batches, weighted_loss
from bench.training.train import build_state, train_iteration


def test_micro_batches_keep_groups_whole_and_weights_sum_to_one():
    mb = torch.tensor([9, 2, 7, 4, 5, 0, 3, 8])
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 4])  # group of each unit id 0..9
    parts = micro_batches(mb, 3, groups)
    assert sorted(torch.cat([p.idx for p in parts]).tolist()) == sorted(mb.tolist())
    for p in parts:
        members = groups[p.idx]
        for g in members.unique():  # a group is in one micro-batch only
            assert int((groups[mb] == g).sum()) == int((members == g).sum())
        assert len(p.idx) <= 3
        assert p.groups == len(members.unique())
    assert sum(p.unit_weight for p in parts) == pytest.approx(1.0)
    assert sum(p.eval_weight for p in parts) == pytest.approx(1.0)
    # A group larger than the micro-batch gets one of its own; without groups plain consecutive chunks.
    assert [len(p.idx) for p in micro_batches(torch.arange(5), 2, torch.tensor([0, 0, 0, 1, 1]))] == [3, 2]
    assert [p.idx.tolist() for p in micro_batches(mb, 3)] == [[9, 2, 7], [4, 5, 0], [3, 8]]
    (whole,) = micro_batches(mb, None)
    assert whole.idx is mb and whole.unit_weight == whole.eval_weight == 1.0


def test_weighted_parts_add_up_to_the_whole_loss():
    # Mean over 5 units of a, KL mean over 5 evaluations of b: split 2 + 3, the weighted parts sum to the whole.
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([0.5, 0.1, 0.2, 0.3, 0.4])
    parts = micro_batches(torch.arange(5), 2)
    total = sum(weighted_loss(a[p.idx].mean(), b[p.idx].mean(), 0.7, p) for p in parts)
    assert float(total) == pytest.approx(float(a.mean() + 0.7 * b.mean()), rel=1e-6)
    stats = StepStats()
    for p in parts:
        stats.add({"ratio_min": float(a[p.idx].min()), "ratio_max": float(a[p.idx].max()),
                   "clip_frac": float(a[p.idx].mean()), "kl": float(b[p.idx].mean())}, 0.0, p)
    assert stats.values["ratio_min"] == 1.0 and stats.values["ratio_max"] == 5.0
    assert stats.values["clip_frac"] == pytest.approx(3.0) and stats.values["kl"] == pytest.approx(0.3)


def test_groups_of_unequal_size_weigh_units_and_evaluations_apart():
    # Tree-like: 7 units in parent groups of sizes 3, 1, 2, 1; the objective averages units, the KL the 4 parents.
    groups = torch.tensor([0, 0, 0, 1, 2, 2, 3])
    a, b = torch.arange(1.0, 8.0), torch.tensor([0.4, 0.1, 0.7, 0.2])
    parts = micro_batches(torch.arange(7), 3, groups)
    assert [p.groups for p in parts] == [1, 2, 1] and [len(p.idx) for p in parts] == [3, 3, 1]
    total = sum(weighted_loss(a[p.idx].mean(), b[groups[p.idx].unique()].mean(), 2.0, p) for p in parts)
    assert float(total) == pytest.approx(float(a.mean() + 2.0 * b.mean()), rel=1e-6)


def _grads_per_step(tmp_path, cache, overrides):
    """Gradients handed to each optimizer step of two iterations, in float64, and the iterations' rows."""
    cfg = compose_config(["grid=smoke", f"results_dir={results_dir(tmp_path, cache)}", "budget.iterations=2", "train.prompts_per_iter=4",
                          "train.group_size=4", "train.minibatches=2", *overrides])
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        s = build_state(cfg)
        s.policy.double()
        steps, step = [], s.opt.step

        def recording_step(*a, **k):
            steps.append({n: p.grad.clone() for n, p in s.params.items()})
            return step(*a, **k)

        s.opt.step = recording_step
        adv = s.methods.advantage
        if hasattr(adv, "leaf_advantages"):  # group advantages are computed in float32 (rewards .float())
            leaf_adv = adv.leaf_advantages
            adv.leaf_advantages = lambda rollout: leaf_adv(rollout).double()
        rows = [train_iteration(s, i) for i in (1, 2)]
    finally:
        torch.set_default_dtype(default)
    assert all(g.dtype == torch.float64 for g in steps[0].values())
    return steps, rows


CASES = {
    "grpo_clip-flow_sde-kl": ["estimator=stepwise", "sampler=flow_sde", "train.kl_coef=0.5",
                              "train.kl_type=transition"],
    "grpo_clip-tree": ["method=tree_grpo", "sampler.steps=4", "train.kl_coef=0.5"],
    "nft-elbo-ode": ["method=nft", "estimator.J=2"],
    "grpo_clip-elbo-ema": ["estimator=elbo", "sampler=ode", "train.old_policy=ema", "train.epochs=2"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_micro_batches_give_the_minibatch_gradient(tmp_path, digits_cache, case):
    whole, rows_whole = _grads_per_step(tmp_path / "whole", digits_cache, CASES[case])
    split, rows_split = _grads_per_step(tmp_path / "split", digits_cache, [*CASES[case], "train.micro_batch=3"])
    assert len(whole) == len(split) >= 4
    for g_whole, g_split in zip(whole, split):
        for n in g_whole:
            torch.testing.assert_close(g_split[n], g_whole[n], rtol=1e-9, atol=1e-12)
    for a, b in zip(rows_whole, rows_split):
        # The same model evaluations (old log-probs cached, none recomputed) and the same statistics.
        assert a["train_forwards"] == b["train_forwards"] and a["train_backwards"] == b["train_backwards"]
        for k in ("loss", "ratio_mean", "ratio_min", "ratio_max", "kl", "grad_norm"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12), k
