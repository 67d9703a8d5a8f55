"""Data-parallel cells under `accelerate launch -m bench.run ...` (docs/sd3.md); a no-op in a single process.

One cell runs on every rank at once. Each rank draws its own share of the iteration's prompts (P / world size,
from its own random stream), so every prompt's group lives on one rank and group advantages are exact; LoRA
gradients are averaged across ranks inside the backward pass (a post-accumulate hook per parameter, so gradient
clipping sees the averaged gradient, as under DDP); model-evaluation counts are summed and wall time is the
slowest rank's, so NFE is global and device-hours = wall x world size. Rank 0 is the one writer: it evaluates,
writes metrics, samples, checkpoints, status and the grid report; the other ranks keep their own checkpoint (their
random stream) under <cell>/.rank<r>/ so a resumed cell continues every stream.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from bench.errors import UserError
from bench.meter import ComputeMeter

_STATE: bool | None = None


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
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
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
        """Rank 0 evaluates (and writes the sample grid); every rank gets its figures."""
        metrics = self.world.evaluate(model, out_dir, tag) if is_main() else None
        return broadcast_object(metrics)


def _average_grad(param: torch.Tensor) -> None:
    import torch.distributed as dist

    g = param.grad.to(_comm_device())
    dist.all_reduce(g)
    param.grad.copy_(g / world_size())


def _broadcast_from_main(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    x = t.detach().to(_comm_device()).clone()
    dist.broadcast(x, src=0)
    return x.to(t.device)


def wrap(world: Any, policy: Any) -> tuple[Any, Any]:
    """(world, policy) for this rank: rank 0's start weights, gradients averaged over ranks; unchanged in one process."""
    if not active():
        return world, policy
    for p in policy.trainable_named_parameters().values():
        with torch.no_grad():
            p.copy_(_broadcast_from_main(p))
        p.register_post_accumulate_grad_hook(_average_grad)
    return RankWorld(world), policy


def rank_cell_dir(cell_dir: Path) -> Path:
    """Where this rank's train_cell writes: the cell folder on rank 0, a private subfolder on the others."""
    return Path(cell_dir) if is_main() else Path(cell_dir) / f".rank{rank()}"


def _sync_rank_checkpoint(cell_dir: Path, checkpoint_file: str) -> None:
    """A rank whose private checkpoint is missing or from another iteration starts from rank 0's."""
    main_ckpt = Path(cell_dir) / checkpoint_file
    main_iter = broadcast_object(torch.load(main_ckpt, map_location="cpu", weights_only=False)["iteration"]
                                 if is_main() and main_ckpt.exists() else None)
    if is_main():
        return
    mine = rank_cell_dir(cell_dir) / checkpoint_file
    my_iter = torch.load(mine, map_location="cpu", weights_only=False)["iteration"] if mine.exists() else None
    if my_iter != main_iter:
        mine.parent.mkdir(parents=True, exist_ok=True)
        if main_iter is None:
            mine.unlink(missing_ok=True)
            (mine.parent / "metrics.jsonl").unlink(missing_ok=True)
        else:
            shutil.copyfile(main_ckpt, mine)


def run_grid(grid_name: str, base: Any, cells: list[Any], open_results: Callable[[Any, str], Path],
             finish: Callable[..., Path]) -> int:
    """bench.run's driver under a multi-process launch: every rank trains each cell together, rank 0 writes."""
    from bench import store
    from bench.execute import read_base_metrics, run_base
    from bench.grid import resolved_yaml
    from bench.loggers import open_logger
    from bench.train import train_cell

    init()  # before any world is built: "cuda" must already mean this rank's GPU
    grid_dir = open_results(base, grid_name) if is_main() else Path(base.results_dir) / grid_name
    barrier()
    valid = [c for c in cells if c.skip_reason is None]
    if is_main():
        from bench.run import write_grid_meta  # grid.yaml + cells.json up front, as the single-process runner

        print(f"data-parallel over {world_size()} processes; rank 0 writes {grid_dir}", flush=True)
        write_grid_meta(grid_name, base, cells, grid_dir)
        run_base(valid[0], grid_dir)  # evaluation only: no collective inside
    barrier()
    results: dict[str, str] = {}
    for cell in valid:
        cell_dir = grid_dir / cell.name
        done = broadcast_object(store.read_status(cell_dir)["status"] == "done" if is_main() else None)
        if done:
            results[cell.name] = "done"
            continue
        if is_main():
            cell_dir.mkdir(parents=True, exist_ok=True)
            store.atomic_write_text(cell_dir / store.CONFIG_FILE, resolved_yaml(cell.cfg))
            store.write_status(cell_dir, "running", processes=world_size())
        _sync_rank_checkpoint(cell_dir, store.CHECKPOINT_FILE)
        logger = open_logger(cell.cfg, cell_dir, cell.name, cell.method) if is_main() else None
        try:
            train_cell(cell.cfg, rank_cell_dir(cell_dir), position=1, on_row=logger.log if logger else None)
        except Exception as e:
            # The other ranks are now blocked in a collective; stop the whole launch (the cell resumes on rerun).
            if is_main():
                store.write_status(cell_dir, "failed", error=f"{type(e).__name__}: {e} (rank {rank()})")
            raise
        finally:
            if logger is not None:
                logger.close()
        if is_main():
            store.write_status(cell_dir, "done")
        results[cell.name] = "done"
        barrier()
    if not is_main():
        return 0
    report = finish(grid_name, base, cells, grid_dir, read_base_metrics(grid_dir))
    skipped = len(cells) - len(valid)
    print(f"{len(results)} cells done, 0 failed, {skipped} skipped -> {report}")
    return 0

