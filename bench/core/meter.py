"""The compute meter: every model call is counted here (DESIGN section 9)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

PHASES = ("rollout", "reward", "train", "eval")


@dataclass
class IterationCompute:
    """Counts for one training iteration; NFE-equivalents weight forward=1, forward+backward=3."""

    rollout_forwards: int = 0
    train_forwards: int = 0
    train_backwards: int = 0
    reward_calls: int = 0
    eval_forwards: int = 0
    wall_s: float = 0.0
    phase_s: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PHASES})

    @property
    def nfe(self) -> int:
        # A backward costs about two forwards, so forward+backward counts 3.
        return self.rollout_forwards + (self.train_forwards - self.train_backwards) + 3 * self.train_backwards


class ComputeMeter:
    """Counts per-sample model evaluations by phase and wall time; eval is never charged to training."""

    def __init__(self, num_devices: int = 1, device: torch.device | str = "cpu"):
        self.num_devices = num_devices
        self.device = torch.device(device)
        self.phase_name: str | None = None
        self.current = IterationCompute()
        self.total_nfe = 0
        self.total_device_s = 0.0
        self.total_wall_s = 0.0
        self._iter_start: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str):
        if name not in PHASES:
            raise ValueError(f"unknown meter phase '{name}'; valid: {', '.join(PHASES)}")
        outer, self.phase_name = self.phase_name, name
        self._sync()
        start = time.perf_counter()
        try:
            yield self
        finally:
            self._sync()
            self.current.phase_s[name] += time.perf_counter() - start
            self.phase_name = outer

    def count_forward(self, batch: int) -> None:
        """Count `batch` per-sample model evaluations in the current phase."""
        p = self.phase_name
        if p == "rollout":
            self.current.rollout_forwards += batch
        elif p == "train":
            self.current.train_forwards += batch
            if torch.is_grad_enabled():
                # Every grad-enabled forward in the train phase is backpropagated.
                self.current.train_backwards += batch
        elif p == "eval":
            self.current.eval_forwards += batch
        else:
            raise RuntimeError(f"model call outside a metered phase (phase={p!r})")

    def count_reward(self, batch: int) -> None:
        self.current.reward_calls += batch

    def start_iteration(self) -> None:
        self.current = IterationCompute()
        self._sync()
        self._iter_start = time.perf_counter()

    def end_iteration(self) -> dict:
        """Close the iteration (eval time excluded) and return its figures plus running totals."""
        self._sync()
        c = self.current
        c.wall_s = time.perf_counter() - self._iter_start - c.phase_s["eval"]
        self.total_nfe += c.nfe
        self.total_wall_s += c.wall_s
        self.total_device_s += c.wall_s * self.num_devices
        row = {
            "rollout_forwards": c.rollout_forwards,
            "train_forwards": c.train_forwards,
            "train_backwards": c.train_backwards,
            "reward_calls": c.reward_calls,
            "nfe_iter": c.nfe,
            "nfe": self.total_nfe,
            "iter_wall_s": c.wall_s,
            "wall_s": self.total_wall_s,
            "device_s": self.total_device_s,
            "device_hours": self.total_device_s / 3600.0,
            "peak_mem_mb": peak_memory_mb(self.device),
        }
        for p in ("rollout", "reward", "train"):
            row[f"{p}_s"] = c.phase_s[p]
        return row

    def state_dict(self) -> dict:
        return {"total_nfe": self.total_nfe, "total_wall_s": self.total_wall_s, "total_device_s": self.total_device_s}

    def load_state_dict(self, d: dict) -> None:
        self.total_nfe, self.total_wall_s, self.total_device_s = d["total_nfe"], d["total_wall_s"], d["total_device_s"]


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory (CUDA) or peak resident set size of this process (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
