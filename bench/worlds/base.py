"""The world interface the training loop talks to."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from bench.worlds.detectors import Detector
from bench.core.errors import UserError
from bench.core.meter import ComputeMeter
from bench.core.policy import Cond, Policy, PolicyCall
from bench.rewards.combine import WeightedReward
from bench.core.schema import Configurable, Option
from bench.core.threads import cap_threads


def check_device(device: str | None, key: str = "world.device") -> None:
    """UserError if `device` names an accelerator this machine does not have (null: pick what is there)."""
    if device is None or device == "cpu":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"{key}={device}: not a device; valid: cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0 or (dev.index is not None and dev.index >= n):
            raise UserError(f"{key}={device}: no such CUDA device here ({n} visible); valid: "
                            f"{', '.join(['cpu'] + [f'cuda:{i}' for i in range(n)])}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{key}={device}: MPS is not available here; valid: cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{key}={device}: unsupported device type; valid: cpu, cuda, cuda:N, mps")


class World(Configurable):
    """A policy model, its prompts, its rewards and its evaluation protocol."""

    GROUP = "world"
    OPTIONS = {
        "device": Option(None, str, nullable=True, help="cpu | cuda | cuda:N; null: cuda if available, else cpu"),
        "threads": Option(None, int, low=1, nullable=True, help="torch CPU threads; null: torch's default"),
        "reward": Option("digit_judge", object, valid="a reward name or {name: weight}"),
        "reward_options": Option({}, dict, help="per reward: its options"),
    }
    name = "world"
    latent_shape: tuple[int, ...] = ()
    # The eval figures evaluate() returns (eval_* key -> what it measures); the report shows only these (and the
    # reward's parts, eval_reward_<name>). Worlds extend it.
    EVAL_METRICS: dict[str, str] = {"eval_reward": "mean training reward on the eval prompts"}

    @classmethod
    def sample_layout(cls) -> tuple[list[str], int] | None:
        """(prompt of each row, samples per row) of the eval sample sheets evaluate() writes, for the report's
        prompt x iteration grids; None: the sheets are shown whole."""
        return None

    @classmethod
    def detectors(cls) -> list[Detector]:
        """The world's collapse / reward-hacking detectors (bench/worlds/detectors.py); none by default, and then the
        report gives no hacking verdict either way."""
        return []

    def __init__(self, cfg: Mapping[str, Any], cache_dir: Path):
        self.cfg = self.resolve_options(cfg)
        self.cache_dir = Path(cache_dir)
        self.device = torch.device(self.cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._reward: WeightedReward | None = None
        if self.cfg.get("threads"):
            # Small CPU models gain nothing from intra-op threads, and on a shared machine the threads'
            # spin-waits cost up to 50x (measured on the digits MLP with other jobs running).
            # Every pool, not torch's alone: numpy's OpenBLAS spin-waits after the judges' calls (bench/core/threads.py).
            cap_threads(int(self.cfg["threads"]))

    # -- model -----------------------------------------------------------------------------
    def build_policy(self) -> Policy:
        """The pretrained base policy, trainable parameters marked requires_grad."""
        raise NotImplementedError

    # -- prompts ---------------------------------------------------------------------------
    def train_prompts(self) -> list[str]:
        raise NotImplementedError

    def sample_prompts(self, n: int, generator: torch.Generator) -> list[str]:
        pool = self.train_prompts()
        idx = torch.randint(len(pool), (n,), generator=generator)
        return [pool[i] for i in idx.tolist()]

    def encode(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    # -- rewards ---------------------------------------------------------------------------
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Final samples -> images [B, C, H, W] in [0, 1]."""
        raise NotImplementedError

    @property
    def reward_fn(self) -> WeightedReward:
        if self._reward is None:
            self._reward = WeightedReward(self.cfg.get("reward", "digit_judge"), self, self.cfg.get("reward_options"))
        return self._reward

    def reward(self, x0: torch.Tensor, prompts: list[str], meter: ComputeMeter | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            images = self.decode(x0)
            if meter is not None:
                meter.count_reward(len(prompts))
            return self.reward_fn(images, prompts)

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, model: PolicyCall, out_dir: Path | None, tag: str) -> dict[str, float]:
        """Eval figures (prefixed eval_) on fixed held-out noise; writes a sample grid PNG to out_dir."""
        raise NotImplementedError
