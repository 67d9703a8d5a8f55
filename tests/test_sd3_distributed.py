"""bench.runner.distributed on two CPU processes (gloo): averaged LoRA gradients, global compute counts, prompt shards."""
from __future__ import annotations

import pytest

import json
import os
import socket

import torch
import torch.multiprocessing as mp
from torch import nn

from bench.runner import distributed, store
from bench.core.policy import Policy


class _Lin(Policy):
    def __init__(self):
        super().__init__()
        self.base = nn.Linear(3, 2)
        self.base.requires_grad_(False)
        self.lora = nn.Linear(3, 2, bias=False)

    def velocity(self, x, t, cond):
        return self.base(x) + self.lora(x)


class _World:
    device = torch.device("cpu")

    def sample_prompts(self, n, gen):
        pool = [f"prompt {i}" for i in range(100)]
        return [pool[i] for i in torch.randint(len(pool), (n,), generator=gen).tolist()]

    def evaluate(self, model, out_dir, tag):
        return {"eval_reward": float(distributed.rank() + 1)}  # only rank 0's value may come back


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.manual_seed(100)  # the same frozen base on every rank, as when loaded from disk
    policy = _Lin()
    with torch.no_grad():
        policy.lora.weight.add_(rank)  # a different adapter init: wrap() must replace it with rank 0's
    world, policy = distributed.wrap(_World(), policy)
    x_all = torch.arange(24, dtype=torch.float32).view(8, 3) / 10
    x = x_all[rank * 4:(rank + 1) * 4]  # this rank's shard
    loss = policy.velocity(x, None, None).pow(2).mean()
    loss.backward()
    meter = distributed.make_meter("cpu")
    meter.start_iteration()
    with meter.phase("rollout"):
        meter.count_forward(10 + rank)
    row = meter.end_iteration()
    gen = torch.Generator().manual_seed(0)
    prompts = world.sample_prompts(4, gen)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"grad": policy.lora.weight.grad.tolist(), "weight": policy.lora.weight.tolist(),
                   "x_all": x_all.tolist(), "row": row, "prompts": prompts,
                   "eval": world.evaluate(None, None, "t"), "gathered": distributed.all_gather(torch.tensor([rank])).tolist(),
                   "device_s": meter.total_device_s, "num_devices": meter.num_devices}, f)
    import torch.distributed as dist

    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_data_parallel(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # Rank 0's initial weights everywhere, and the full-batch gradient (mean of the two shards' mean losses).
    assert r0["weight"] == r1["weight"]
    torch.manual_seed(100)
    ref = _Lin()
    ref.lora.weight.data = torch.tensor(r0["weight"])
    ref.velocity(torch.tensor(r0["x_all"]), None, None).pow(2).mean().backward()
    torch.testing.assert_close(torch.tensor(r0["grad"]), ref.lora.weight.grad, rtol=1e-6, atol=1e-7)
    assert r0["grad"] == r1["grad"]
    # Counts summed over ranks; the same wall time (the slowest) on both; device-seconds = wall x 2.
    assert r0["row"]["rollout_forwards"] == r1["row"]["rollout_forwards"] == 21
    assert r0["row"]["nfe"] == 21 and r0["row"]["wall_s"] == r1["row"]["wall_s"]
    assert r0["num_devices"] == 2 and abs(r0["device_s"] - 2 * r0["row"]["wall_s"]) < 1e-12
    # Each rank draws its own half of the prompts; evaluation figures are rank 0's on every rank.
    assert len(r0["prompts"]) == len(r1["prompts"]) == 2 and r0["prompts"] != r1["prompts"]
    assert r0["eval"] == r1["eval"] == {"eval_reward": 1.0}
    assert r0["gathered"] == r1["gathered"] == [0, 1]


def test_single_process_is_a_no_op():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    policy, world = _Lin(), _World()
    assert distributed.wrap(world, policy) == (world, policy)
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_gather(t) is t
    assert type(distributed.make_meter("cpu")).__name__ == "ComputeMeter"


@pytest.mark.slow  # CI runs it (python -m pytest -m slow); the default suite stays under 5 min
def test_torchrun_two_ranks_train_one_sd3_cell(tmp_path):
    """`torchrun --nproc_per_node 2 -m bench.run grid=sd3_smoke ...` (what accelerate launch runs): one writer,
    the same compute counts as one process, identical LoRA weights on both ranks."""
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    args = ["grid=sd3_smoke", "estimator=elbo", "sampler=ode", "budget.iterations=2", f"results_dir={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*torchrun.split(), "--standalone", "--nproc_per_node", "2", "-m", "bench.run", *args],
                          env=env, capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data-parallel over 2 processes" in proc.stdout and "1 cells done, 0 diverged, 0 failed" in proc.stdout
    cell = tmp_path / "sd3_smoke" / "elbo-ode-seed0"
    rows = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    # 2 prompts x 4 samples x 4 steps x 2 (CFG) rollout forwards in all, split over the ranks.
    assert rows[1]["rollout_forwards"] == 64 and abs(rows[1]["device_s"] - 2 * rows[1]["iter_wall_s"]) < 1e-9
    assert json.loads((cell / "status.json").read_text())["status"] == "done"
    assert (cell / "samples" / "eval_0002.png").exists() and not (cell / ".rank1" / "samples").exists()
    main, other = (store.load_checkpoint(p) for p in (cell, cell / ".rank1"))
    assert main["params"].keys() == other["params"].keys()
    assert all(torch.equal(main["params"][k], other["params"][k]) for k in main["params"])
    assert not torch.equal(main["generator"], other["generator"])  # each rank its own stream
    assert (tmp_path / "sd3_smoke" / "report.md").exists() and (tmp_path / "sd3_smoke" / "cells.json").exists()


def _eval_world():
    from bench.worlds.sd3 import SD3World
    from bench.worlds.sd3_tiny import tiny_world_config

    cfg = tiny_world_config(prompts={"eval_max": 5}, eval={"num_prompts": 3, "samples_per_prompt": 2, "steps": 2,
                                                            "batch_size": 2, "grid_max": 4})
    return SD3World(cfg, "/tmp")


def _eval_worker(rank: int, port: int, out: str) -> None:
    from bench.core.meter import ComputeMeter
    from bench.core.policy import PolicyCall

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    world = _eval_world()
    rank_world, policy = distributed.wrap(world, world.build_policy())
    meter = ComputeMeter()
    with meter.phase("eval"):
        metrics = rank_world.evaluate(PolicyCall(policy, meter), tmp := __import__("pathlib").Path(out) / f"r{rank}", "t")
    with open(f"{out}/eval{rank}.json", "w") as f:
        json.dump({"metrics": metrics, "forwards": meter.current.eval_forwards, "sheet": (tmp / "eval_t.png").exists()}, f)
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.slow  # 24 s; CI runs it (python -m pytest -m slow)
def test_two_process_eval_is_sharded_and_equals_one_process(tmp_path):
    """3 eval batches (1 prompt x 2 samples each) over 2 ranks: each samples its own, on the noise one process
    draws for them; the gathered figures equal one process's, and only rank 0 writes the sheet."""
    from bench.core.meter import ComputeMeter
    from bench.core.policy import PolicyCall

    mp.start_processes(_eval_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"eval{r}.json").read_text()) for r in (0, 1))
    world = _eval_world()
    meter = ComputeMeter()
    with meter.phase("eval"):
        one = world.evaluate(PolicyCall(world.build_policy(), meter), tmp_path / "one", "t")
    assert r0["metrics"] == r1["metrics"] == one
    # CFG doubles the batch: 2 steps x 2 samples x 2 per batch; rank 0 runs batches 0 and 2, rank 1 batch 1.
    assert (r0["forwards"], r1["forwards"], meter.current.eval_forwards) == (16, 8, 24)
    assert r0["sheet"] and not r1["sheet"]
