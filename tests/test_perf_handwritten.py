"""The hand-written reference loops of `python -m bench.perf` (issue 12): the same work as the presets they are
read against (NFE by the DESIGN formulas, Flow-GRPO's SDE step as the suite's kernel computes it), and their rows
in the `methods` table."""
from __future__ import annotations

import pytest
import torch

from bench import perf
from bench.perf import handwritten as hw
from samplers.kernels import FlowSDE, gaussian_logp
from samplers.tree import tree_nfe


@pytest.fixture(scope="module")
def flow_loop() -> hw.HandWritten:
    return hw.HandWritten("flow_grpo")


def test_flow_grpo_iteration_costs_the_presets_nfe(flow_loop: hw.HandWritten) -> None:
    row = flow_loop.iterate()
    # 64 chains x 10 rollout forwards, then 9 trained steps x 64 edges at forward + backward (3 NFE).
    assert row["nfe"] == 8 * 8 * 10 + 3 * 9 * 64 == 2368
    assert 0 < row["model"] < row["wall"] and 0 < row["reward"] < row["wall"] and 0 < row["outside"] < 1


def test_tree_iteration_costs_design_formula_nfe(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = hw.HandWritten("tree_grpo")
    for start in (0, 4, 7):
        monkeypatch.setattr(hw.torch, "randint", _first_call_returns(start))
        nfe = loop.iterate()["nfe"]
        # 8 roots (one per prompt), DESIGN section 5's per-root count, plus 3 NFE per window parent (13 per root).
        assert nfe == 8 * tree_nfe(3, 3, start, 10) + 3 * 8 * 13


def _first_call_returns(start: int):
    real, calls = torch.randint, []

    def randint(high, size, generator=None):
        calls.append(1)
        return torch.tensor([start]) if len(calls) == 1 else real(high, size, generator=generator)
    return randint


def test_sde_step_matches_the_suites_kernel() -> None:
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)
    kernel = FlowSDE(0.7)
    for i in (0, 3, 8):
        s, s_next = hw.SCHED_LIST[i], hw.SCHED_LIST[i + 1]
        mu_ref, scale_ref = kernel.mean_scale(x, v, hw.SCHED[i].expand(16), hw.SCHED[i + 1].expand(16), hw.SCHED)
        mu, scale = hw.sde_mean_scale(x, v, s, s_next, hw.SCHED_FIRST)
        torch.testing.assert_close(mu, mu_ref, rtol=1e-6, atol=1e-6)
        assert scale == pytest.approx(float(scale_ref[0]), rel=1e-6)
        x_next = mu_ref + scale_ref[:, None] * torch.randn(16, 64, generator=g)
        torch.testing.assert_close(hw.logp_mean(x_next, mu, scale), gaussian_logp(x_next, mu_ref, scale_ref),
                                   rtol=1e-5, atol=1e-5)
        rows = hw.sde_mean_scale_rows(x, v, hw.SCHED[i].expand(16), hw.SCHED[i + 1].expand(16), hw.SCHED_FIRST)
        torch.testing.assert_close(rows[0], mu_ref, rtol=1e-6, atol=1e-6)


def test_methods_table_interleaves_the_reference_rows(capsys: pytest.CaptureFixture) -> None:
    rc = perf.main(["methods", "--world", "digits", "--methods", "flow_grpo,tree_grpo", "--repeats", "1",
                    "--iterations", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert rc == 0, out
    labels = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert labels[1:] == ["flow_grpo", "tree_grpo", "hand-written flow_grpo", "hand-written tree_grpo"]
    assert "tree_grpo / flow_grpo per NFE, presets:" in out and "hand-written loops:" in out


def test_bad_option_exits_2(capsys: pytest.CaptureFixture) -> None:
    assert perf.main(["handwritten", "--repeats", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--repeats" in err
