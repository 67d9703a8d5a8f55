"""Data-parallel cells under `accelerate launch -m bench.run ...` (docs/sd3.md); a no-op in a single process.

One cell runs on every rank at once. Each rank draws its own share of the iteration's prompts (P / world size,
from its own random stream), so every prompt's group lives on one rank and group advantages are exact; LoRA
gradients are averaged across ranks inside the backward pass by torch's DistributedDataParallel (bucketed
all-reduces that overlap the backward, DIFFRL_DDP_BUCKET_MB per bucket; gradient clipping sees the averaged
gradient), the trainable parameters only (the frozen base is the same file on every rank, never broadcast); the
process group times out after DIFFRL_DDP_TIMEOUT_S seconds (a rank that died or hangs stops the launch instead of
holding the others forever); model-evaluation counts are summed and wall time is the
slowest rank's, so NFE is global and device-hours = wall x world size. Evaluation of the sd3 world is sharded (each rank samples and scores its batches
on the one-process noise; scores gathered); other worlds evaluate on rank 0. Rank 0 is the one writer: it evaluates,
writes metrics, samples, checkpoints, status and the grid report; the other ranks keep their own checkpoint (their
random stream) under <cell>/.rank<r>/ so a resumed cell continues every stream.
"""
from __future__ import annotations

import functools
import inspect
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from bench.runner import store
from bench.core.errors import UserError
from bench.core.meter import ComputeMeter

_STATE: bool | None = None
# Environment, not config: these shape how ranks talk, not what a cell computes (its hash), and every rank started
# by `accelerate launch` / torchrun inherits them.
BUCKET_MB = float(os.environ.get("DIFFRL_DDP_BUCKET_MB", "25"))      # DDP's own default bucket size
TIMEOUT_S = float(os.environ.get("DIFFRL_DDP_TIMEOUT_S", "1800"))   # torch's default for NCCL is 10 min


def _env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    """True under a multi-process launch (accelerate launch / torchrun with WORLD_SIZE > 1)."""
    return _env_world_size() > 1


def init() -> None:
    """Join the process group that `accelerate launch` / torchrun describe in the environment (once); binds this
    rank's GPU (LOCAL_RANK) and uses NCCL on CUDA, gloo on CPU."""
    global _STATE
    if _STATE is not None or not active():
        return
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                                timeout=timedelta(seconds=TIMEOUT_S))
    _STATE = True


def world_size() -> int:
    """Number of processes (1 outside a multi-process launch)."""
    if not active():
        return 1
    init()
    import torch.distributed as dist

    return dist.get_world_size()


def rank() -> int:
    """This process's rank (0 outside a multi-process launch)."""
    if not active():
        return 0
    init()
    import torch.distributed as dist

    return dist.get_rank()


def is_main() -> bool:
    """True on the one writer (rank 0)."""
    return rank() == 0


def _comm_device() -> torch.device:
    import torch.distributed as dist

    init()
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor (same shape on every rank) over ranks along dim 0; the tensor itself in one process."""
    if not active():
        return t
    import torch.distributed as dist

    x = t.detach().to(_comm_device())
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x)
    return torch.cat(out).to(t.device)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank ([obj] in one process)."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if active():
        import torch.distributed as dist

        init()
        dist.barrier()


class DistributedMeter(ComputeMeter):
    """A ComputeMeter whose per-iteration counts are summed over ranks and whose wall time is the slowest rank's."""

    COUNTS = ("rollout_forwards", "train_forwards", "train_backwards", "reward_calls", "eval_forwards")

    def end_iteration(self) -> dict:
        """The iteration's row with counts summed over ranks and the slowest rank's wall time (same on every rank)."""
        import torch.distributed as dist

        c = self.current
        local = torch.tensor([float(getattr(c, k)) for k in self.COUNTS], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(local)
        for k, v in zip(self.COUNTS, local.tolist()):
            setattr(c, k, int(round(v)))
        row = super().end_iteration()  # accumulates the now-global counts into total_nfe
        wall = torch.tensor([c.wall_s], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
        extra = float(wall.item()) - c.wall_s
        c.wall_s += extra
        self.total_wall_s += extra
        self.total_device_s += extra * self.num_devices
        row.update({k: getattr(c, k) for k in self.COUNTS if k in row}, nfe_iter=c.nfe, nfe=self.total_nfe,
                   iter_wall_s=c.wall_s, wall_s=self.total_wall_s, device_s=self.total_device_s,
                   device_hours=self.total_device_s / 3600.0)
        return row


def make_meter(device: torch.device | str) -> ComputeMeter:
    """The cell's meter: device-seconds count every rank's device (wall x world size)."""
    if not active():
        return ComputeMeter(num_devices=1, device=device)
    return DistributedMeter(num_devices=world_size(), device=device)


class RankWorld:
    """A world seen from one rank: its share of the prompts from its own stream; evaluation on rank 0 only."""

    def __init__(self, world: Any):
        self.world = world

    def __getattr__(self, name: str) -> Any:
        return getattr(self.world, name)

    def sample_prompts(self, n: int, generator: torch.Generator) -> list[str]:
        """This rank's n / world_size prompts, from a stream of its own."""
        ws = world_size()
        if n % ws:
            raise UserError(f"train.prompts_per_iter={n} must be a multiple of the number of processes ({ws})")
        # A common draw plus the rank reseeds the stream: ranks draw different prompts and noise, and every stream
        # stays a function of the cell seed (and of the checkpointed generator on resume).
        base = int(torch.randint(2**62, (1,), generator=generator))
        generator.manual_seed(base + 1_000_003 * rank())
        return self.world.sample_prompts(n // ws, generator)

    def evaluate(self, model: Any, out_dir: Path | None, tag: str) -> dict[str, float]:
        """A world whose evaluate takes a `shard` (sd3) evaluates its batches on all ranks at once and gathers
        the scores (rank 0 writes the sample grid); any other is evaluated by rank 0 alone. Every rank gets the
        figures, the one-process figures either way."""
        if "shard" in inspect.signature(self.world.evaluate).parameters:
            return self.world.evaluate(model, out_dir if is_main() else None, tag, shard=(rank(), world_size()),
                                       gather=all_gather_objects)
        metrics = self.world.evaluate(model, out_dir, tag) if is_main() else None
        return broadcast_object(metrics)


def _own(policy: Any, params: dict[str, torch.Tensor]) -> bool:
    """True while the policy holds its own trainable parameters (not weights swapped in by functional_call)."""
    return all(functools.reduce(getattr, n.split("."), policy) is p for n, p in params.items())


def wrap(world: Any, policy: Any) -> tuple[Any, Any]:
    """(world, policy) for this rank: rank 0's start weights, gradients averaged over ranks; unchanged in one process.

    The policy is wrapped in DistributedDataParallel (which broadcasts rank 0's trainable weights) and its
    `velocity` rerouted through the wrapper whenever a backward may follow (grad enabled, the policy's own weights):
    the loop keeps calling the policy as before, and DDP's reducer sees every forward it must sync. Rollouts,
    evaluation and forwards under other weights (old policy, EMA, reference: functional_call) bypass it."""
    if not active():
        return world, policy
    from torch.nn.parallel import DistributedDataParallel as DDP

    init()
    params = dict(policy.trainable_named_parameters())
    frozen = [n for n, _ in policy.named_parameters() if n not in params] + [n for n, _ in policy.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(policy, frozen)
    device = next(iter(params.values())).device
    ddp = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
              bucket_cap_mb=BUCKET_MB, find_unused_parameters=False)
    direct = policy.velocity  # the class's own method, bound
    inside = [False]

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        if inside[0] or not torch.is_grad_enabled() or not _own(policy, params):
            return direct(x, t, cond)
        inside[0] = True  # DDP's forward calls policy.forward -> self.velocity: the direct one this time
        try:
            return ddp(x, t, cond)
        finally:
            inside[0] = False

    policy.velocity = velocity  # an instance attribute: shadows the method for every caller
    return RankWorld(world), policy


def rank_cell_dir(cell_dir: Path) -> Path:
    """Where this rank's train_cell writes: the cell folder on rank 0, a private subfolder on the others."""
    return Path(cell_dir) if is_main() else Path(cell_dir) / f".rank{rank()}"


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any (one process: the flag), so all ranks take the same branch."""
    if not active():
        return bool(flag)
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def sync_rank_checkpoint(cell_dir: Path) -> None:
    """A rank whose private checkpoints are not rank 0's (other iterations, or missing) takes copies of all of rank
    0's, so that when rank 0 falls back from a corrupt newest checkpoint the others fall back to the same iteration
    (its random stream is then rank 0's until the streams are reseeded). A no-op in one process."""
    if not active():
        return
    main_names = broadcast_object([p.name for p in store.checkpoint_paths(cell_dir)] if is_main() else None)
    if is_main():
        return
    mine = rank_cell_dir(cell_dir)
    mine.mkdir(parents=True, exist_ok=True)
    if [p.name for p in store.checkpoint_paths(mine)] == main_names:
        return
    for p in store.checkpoint_paths(mine):
        p.unlink()
    (mine / store.METRICS_FILE).unlink(missing_ok=True)
    for name in main_names:
        shutil.copyfile(Path(cell_dir) / name, mine / name)
