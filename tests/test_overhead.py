"""Issue 12's overhead work: tree backups without torch.unique against a per-parent loop, thread caps on every
pool, the frozen loop config, the late eval schedule, the report freshness key, lifelines through a fork server,
the vectorised spread means, and `python -m bench.perf` (methods) printing its table."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from threadpoolctl import threadpool_info

from bench.core import threads
from bench.core.frozen import FrozenConfig, frozen
from bench.core.meter import ComputeMeter
from bench.core.policy import PolicyCall
from bench.perf import main as perf_main
from bench.reporting.spread import _seed_means
from bench.runner import freshness, store
from bench.training.train import eval_due
from bench.worlds.digits_model import DigitsFlowMLP
from objectives.tree_advantage import propagate_up
from samplers.tree import TreeSampler


def reference_backup(rollout, leaf_adv: torch.Tensor, alpha: float, per_dim: bool) -> list[float]:
    """The backup written out node by node in Python floats: A(u) = sum_c softmax(alpha logp(c)) A(c)."""
    n = rollout.num_nodes
    parent, step = rollout.parent.tolist(), rollout.step.tolist()
    logp = [v / (rollout.x[0].numel() if per_dim else 1) for v in rollout.logp_old.double().tolist()]
    adv = [0.0] * n
    for leaf, a in zip(rollout.leaves.tolist(), leaf_adv.double().tolist()):
        adv[leaf] = a
    children: dict[int, list[int]] = {}
    for c, p in enumerate(parent):
        if p >= 0:
            children.setdefault(p, []).append(c)
    for p in sorted(children, key=lambda u: -step[u]):  # deepest parents first
        z = [alpha * logp[c] for c in children[p]]
        w = [math.exp(v - max(z)) for v in z]
        adv[p] = sum(wi * adv[c] for wi, c in zip(w, children[p])) / sum(w)
    return adv


@pytest.mark.parametrize("k,d,s,alpha,per_dim", [(3, 3, 2, 1.0, True), (2, 2, 0, 0.0, True), (3, 2, 5, 1.0, False),
                                                  (2, 3, 4, 3.0, False)])
def test_propagate_up_matches_per_parent_loop(k, d, s, alpha, per_dim):
    torch.manual_seed(0)
    model = PolicyCall(DigitsFlowMLP(hidden=32, depth=2), ComputeMeter())
    sampler = TreeSampler({"steps": 8, "branches": k, "depth": d, "window": {"schedule": "fixed", "start": s}})
    model.meter.start_iteration()
    with model.meter.phase("rollout"), torch.no_grad():
        rollout = sampler.sample(model, ["p"] * 3, torch.arange(3), 2 * k**d, (64,), torch.Generator().manual_seed(1))
    leaf_adv = torch.randn(len(rollout.leaves), generator=torch.Generator().manual_seed(2))
    got = propagate_up(rollout, leaf_adv, alpha, per_dim)
    want = torch.tensor(reference_backup(rollout, leaf_adv, alpha, per_dim), dtype=torch.float64).float()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
    # Single-child links copy exactly: a root's value is its window-start node's.
    roots = (rollout.parent < 0).nonzero().squeeze(1)
    assert torch.equal(got[roots], got[roots + len(roots)]) if s > 0 else True


def test_cap_threads_limits_torch_blas_openmp_and_environment(monkeypatch):
    import numpy  # noqa: F401  (its BLAS is the pool that spun)
    import sklearn.neural_network  # noqa: F401  (loads scikit-learn's own OpenMP runtime)

    before = torch.get_num_threads()
    for var in threads.ENV_VARS:
        monkeypatch.setenv(var, os.environ.get(var, ""))
    try:
        threads.cap_threads(2)
        assert torch.get_num_threads() == 2 and threads.current_cap() == 2
        assert os.environ["OMP_NUM_THREADS"] == "2" and os.environ["OPENBLAS_NUM_THREADS"] == "1"
        pools = threadpool_info()
        assert {p["user_api"] for p in pools} >= {"blas", "openmp"}
        assert all(p["num_threads"] == (1 if p["user_api"] == "blas" else 2) for p in pools)
        threads.cap_threads(1)
        assert torch.get_num_threads() == 1 and all(p["num_threads"] == 1 for p in threadpool_info())
    finally:
        torch.set_num_threads(before)


def test_frozen_config_reads_like_the_omegaconf_one():
    from omegaconf import OmegaConf

    src = OmegaConf.create({"train": {"lr": 1e-3, "ema_ramp": None, "tags": [{"a": 1}]}, "seed": 3})
    cfg = frozen(src)
    assert cfg.train.lr == 1e-3 and cfg.train.get("ema_ramp") is None and cfg.train.get("missing", 7) == 7
    assert cfg.seed == 3 and cfg.train.tags[0].a == 1 and isinstance(cfg.train, FrozenConfig)
    with pytest.raises(AttributeError, match="no key 'nope'"):
        _ = cfg.train.nope
    with pytest.raises(TypeError):
        cfg.train.lr = 1.0


def test_late_eval_factor_stretches_the_period_after_late_from_nfe():
    def schedule(**ev):
        cfg = frozen({"eval": {"every": 5, "every_nfe": None, **ev}})
        nfe, due = 0, []
        for it in range(1, 41):
            before, nfe = nfe, nfe + 1000  # 1000 NFE per iteration
            if eval_due(cfg, it, before, nfe):
                due.append(it)
        return due

    assert schedule(every_nfe=5000) == [5, 10, 15, 20, 25, 30, 35, 40]  # the default: unchanged
    # From 20k NFE on, every 15k: the multiples of 15k crossed after 20k are 30k and 45k (beyond 40k).
    assert schedule(every_nfe=5000, late_from_nfe=20000, late_factor=3) == [5, 10, 15, 20, 30]
    assert schedule(late_from_nfe=10000, late_factor=2) == [5, 10, 20, 30, 40]


def test_report_key_changes_with_any_input(tmp_path: Path):
    cell = SimpleNamespace(name="a-seed0", hash="abc", skip_reason=None, stage="report")
    (tmp_path / "a-seed0").mkdir()
    store.append_metrics(tmp_path / "a-seed0", {"iteration": 0})
    for f in freshness.OUTPUTS:
        (tmp_path / f).write_text("x")
    key = freshness.report_key(tmp_path, {"axes": {}}, [cell])
    assert not freshness.is_fresh(tmp_path, key)
    freshness.mark_fresh(tmp_path, key)
    assert freshness.is_fresh(tmp_path, key)
    assert freshness.report_key(tmp_path, {"axes": {}}, [cell]) == key
    time.sleep(0.01)
    store.append_metrics(tmp_path / "a-seed0", {"iteration": 1})
    assert freshness.report_key(tmp_path, {"axes": {}}, [cell]) != key
    assert freshness.report_key(tmp_path, {"axes": {"x": [1]}}, [cell]) != key
    (tmp_path / "report.md").unlink()
    assert not freshness.is_fresh(tmp_path, key)


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed child of a process that does not reap it stays in the table)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc (Linux)")
def test_die_with_an_ancestor_that_is_not_the_parent(tmp_path: Path):
    """A worker forked by a fork server dies with the runner, its grandparent."""
    ancestor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    script = textwrap.dedent(f"""
        import os, sys, time
        from bench.runner import lifeline
        pid = os.fork()
        if pid == 0:  # the worker: its parent is this middle process, the ancestor is another process
            lifeline.die_with({ancestor.pid}, poll_s=0.05)
            open({str(tmp_path / 'tmp')!r}, 'w').write(str(os.getpid()))
            os.rename({str(tmp_path / 'tmp')!r}, {str(tmp_path / 'ready')!r})
            time.sleep(60)
            os._exit(0)
        time.sleep(60)
    """)
    middle = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        worker = int((tmp_path / "ready").read_text())
        time.sleep(0.3)
        assert running(worker)  # alive while the ancestor is
        ancestor.kill()
        ancestor.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not running(worker):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the worker outlived the process it was told to die with")
    finally:
        for p in (ancestor, middle):
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()


def test_seed_means_equal_a_groupby_per_cell():
    df = pd.DataFrame({"x": ["a", "a", "b", "b", "b"], "y": [1, 1, 1, 2, 2], "seed": [0, 0, 1, 0, 1],
                       "value": [0.25, 0.75, 2.0, 3.0, 5.0]})
    got = _seed_means(df, ["x", "y"])
    assert got == {("a", 1): {0: 0.5}, ("b", 1): {1: 2.0}, ("b", 2): {0: 3.0, 1: 5.0}}


def test_perf_dispatcher_defaults_to_methods_and_refuses_unknown_presets(capsys):
    assert perf_main(["--methods", "nope"]) == 2
    assert "--methods nope: unknown; valid: awm," in capsys.readouterr().err
    assert perf_main(["nosuch"]) == 2


@pytest.mark.slow  # builds two cells and trains them (~10 s on a quiet 2-core machine)
def test_perf_methods_prints_a_row_per_preset(capsys):
    rc = perf_main(["--world", "digits", "--methods", "tree_grpo,flow_grpo", "--repeats", "1", "--iterations", "1",
                    "--warmup", "0", "train.prompts_per_iter=2", "train.group_size=4"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line for line in out.splitlines() if line.startswith("| tree_grpo |") or line.startswith("| flow_grpo |")]
    assert len(rows) == 2
    for line in rows:
        ms, nfe, us, outside, floor, ratio = (c.strip() for c in line.strip("|").split("|")[1:])
        assert float(ms) > 0 and float(us) == pytest.approx(float(ms) * 1e3 / float(nfe), rel=0.02)
        assert 0 <= float(outside.rstrip("%")) <= 100 and float(floor) > 0
    # flow_grpo at 2 prompts x 4: 10 rollout steps x 8 samples + 9 trained steps x 8 samples x 3 (forward+backward)
    assert rows[1].split("|")[3].strip() == str(10 * 8 + 9 * 8 * 3)


def test_tree_share_from_a_summary(tmp_path: Path, capsys):
    from bench.perf import tree_share

    # Two seeds; eval rows every 1000 NFE. tree reaches 0.8 at 1000 NFE / 2 s (seed 0) and 2000 / 4 s (seed 1);
    # flow at 4000 / 4 s and 6000 / 6 s: NFE speed-ups 4 and 3, wall speed-ups 2 and 1.5, share 1.75 / 3.5 = 0.5.
    rows = []
    for seed, tree, flow in ((0, (1, 2.0), (4, 4.0)), (1, (2, 4.0), (6, 6.0))):
        for method, (k, wall) in (("tree_grpo", tree), ("flow_grpo", flow)):
            for i in range(1, 8):
                rows.append({"method": method, "seed": seed, "iteration": i, "nfe": 1000 * i,
                             "wall_s": wall * i / k, "eval_accuracy": 0.9 if i >= k else 0.1})
    pd.DataFrame(rows).to_parquet(tmp_path / "summary.parquet")
    assert perf_main(["tree_share", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 0 | 4.00x | 2.00x | 0.50 |" in out and "| 1 | 3.00x | 1.50x | 0.50 |" in out
    assert "share of the NFE saving: 0.50 [95% CI 0.50, 0.50] over 2 seeds" in out
    assert perf_main(["tree_share", str(tmp_path), "--method", "nope"]) == 2
