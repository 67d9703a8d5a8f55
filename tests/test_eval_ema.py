"""train.eval_ema: an EMA of the weights for evaluation, separate from the EMA old policy, kept across resumes."""
from __future__ import annotations

import pytest
import torch

from bench.runner import store
from bench.runner.config import compose_config
from runner_helpers import digits_cache, results_dir  # noqa: F401 (a fixture)
from bench.training.ema import EvalEMA
from bench.training.train import build_state, checkpoint_state, eval_model, resume, train_cell, train_iteration


def _state(tmp_path, cache, *overrides):
    cfg = compose_config(["grid=smoke", f"results_dir={results_dir(tmp_path, cache)}", "estimator=elbo", "sampler=ode",
                          "train.prompts_per_iter=2", "train.group_size=4", "train.minibatches=1", *overrides])
    return build_state(cfg)


def test_hand_computed_two_step_average():
    p0, p1, p2 = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0]), torch.tensor([-1.0, 4.0])
    ema = EvalEMA({"w": p0}, decay=0.75, every=1)
    ema.step({"w": p1})
    ema.step({"w": p2})
    # 0.75 (0.75 p0 + 0.25 p1) + 0.25 p2
    torch.testing.assert_close(ema.weights["w"], torch.tensor([0.875, -0.125]))
    every2 = EvalEMA({"w": p0}, decay=0.75, every=2)
    every2.step({"w": p1})
    torch.testing.assert_close(every2.weights["w"], p0)  # no average on step 1
    every2.step({"w": p2})
    torch.testing.assert_close(every2.weights["w"], 0.75 * p0 + 0.25 * p2)


def test_decay_zero_follows_the_weights_and_two_iterations_match_the_closed_form(tmp_path, digits_cache):
    s = _state(tmp_path / "a", digits_cache, "train.eval_ema={decay:0.0,every:1}")
    train_iteration(s, 1)
    assert all(torch.equal(s.eval_ema.weights[n], p.detach()) for n, p in s.params.items())
    assert eval_model(s).params is s.eval_ema.weights

    d = 0.6
    s = _state(tmp_path / "b", digits_cache, f"train.eval_ema={{decay:{d},every:1}}")
    p = [{n: q.detach().clone() for n, q in s.params.items()}]
    for i in (1, 2):  # one optimizer step per iteration
        train_iteration(s, i)
        p.append({n: q.detach().clone() for n, q in s.params.items()})
    for n in s.params:
        expected = d * (d * p[0][n] + (1 - d) * p[1][n]) + (1 - d) * p[2][n]
        torch.testing.assert_close(s.eval_ema.weights[n], expected, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(s.eval_ema.weights[n], p[2][n])  # not the current weights
    assert s.ema_params is None  # the EMA old policy is another thing, off here


def test_eval_uses_the_ema_and_resume_restores_it(tmp_path, digits_cache):
    cell = tmp_path / "cell"
    cfg = compose_config(["grid=smoke", f"results_dir={results_dir(tmp_path, digits_cache)}", "estimator=elbo", "sampler=ode",
                          "train.prompts_per_iter=2", "train.group_size=4", "budget.iterations=2", "eval.every=1",
                          "train.eval_ema={decay:0.5,every:1}"])
    train_cell(cfg, cell)
    ckpt = store.load_checkpoint(cell)
    assert ckpt["eval_ema"]["steps"] == 4  # 2 iterations x 2 minibatches
    s = build_state(cfg)
    resume(s, ckpt)
    assert s.eval_ema.steps == 4
    for n, w in ckpt["eval_ema"]["weights"].items():
        assert torch.equal(s.eval_ema.weights[n], w)
    # The logged eval is the EMA policy's: re-evaluating the EMA weights reproduces it, the current ones differ.
    last = store.read_metrics(cell)[-1]
    with s.meter.phase("eval"):
        ema_eval = s.world.evaluate(eval_model(s), None, "x")
    assert ema_eval["eval_accuracy"] == pytest.approx(last["eval_accuracy"])
    assert not any(torch.equal(s.eval_ema.weights[n], p) for n, p in s.params.items())
    assert checkpoint_state(s, 2)["eval_ema"]["steps"] == 4
