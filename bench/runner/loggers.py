"""Optional experiment tracking (logger=tensorboard | wandb) next to the built-in metrics.jsonl; off by default.

The trackers are imported lazily, so the bench runs without them; choosing one that is not installed fails
up front (before any cell runs) with a one-line install hint.
"""
from __future__ import annotations

import hashlib
import importlib
import math
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

from bench.runner.components import plain
from bench.core.errors import UserError
from bench.core.schema import Option

# logger name -> (module to import, pip package that provides it)
REQUIREMENTS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
LOGGER_OPTIONS = {
    "none": {},
    "tensorboard": {"dir": Option("tensorboard", str, help="event files in <cell>/<dir>")},
    "wandb": {"mode": Option("offline", str, choices=("offline", "online", "disabled")),
              "project": Option("diffrl-bench", str), "entity": Option(None, str, nullable=True),
              "tags": Option([], list, item=Option("", str))},
}


class MetricsLogger(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def logger_name(cfg: DictConfig) -> str:
    spec = cfg.get("logger")
    return str(spec.get("name", "none")) if spec else "none"


def _import(name: str) -> Any:
    module, package = REQUIREMENTS[name]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"logger={name} needs the '{package}' package ({e}); install it with: pip install {package} "
                        f"(or pip install 'diffrl-bench[tracking]'), or run with logger=none") from None


def check_logger(cfg: DictConfig) -> None:
    """UserError (with an install hint) if the chosen tracker cannot be used; nothing is written."""
    name = logger_name(cfg)
    if name == "none":
        return
    if name not in REQUIREMENTS:
        raise UserError(f"unknown logger '{name}'; valid: none, {', '.join(REQUIREMENTS)}")
    _import(name)


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    """Numeric columns, grouped for the trackers' dashboards (eval/, train/, compute/)."""
    out = {}
    for k, v in row.items():
        if k == "iteration" or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        group = "eval" if k.startswith("eval_") else "train" if k.startswith(("train_", "loss", "ratio", "kl", "grad")) \
            else "compute"
        out[f"{group}/{k.removeprefix('eval_')}"] = float(v)
    return out


class TensorBoardLogger:
    """Event files in <cell>/<logger.dir>; a resumed cell purges the steps it is about to redo."""

    def __init__(self, cfg: DictConfig, cell_dir: Path):
        self.module = _import("tensorboard")
        self.log_dir = Path(cell_dir) / str(cfg.logger.get("dir", "tensorboard"))
        self.writer = None

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["iteration"])
        if self.writer is None:
            # The first row after a resume is the first iteration after the checkpoint; events written after it
            # by the killed run are stale duplicates.
            self.writer = self.module.SummaryWriter(log_dir=str(self.log_dir), purge_step=step)
        for tag, v in _scalars(row).items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbLogger:
    """An offline wandb run in <cell>/wandb (sync later with `wandb sync`); one run id per cell, so a resumed
    cell continues its run."""

    def __init__(self, cfg: DictConfig, cell_dir: Path, cell_name: str, method: str):
        wandb = _import("wandb")
        lc = cfg.logger
        grid = str(cfg.grid.get("name", "")) if cfg.get("grid") else ""
        run_id = hashlib.sha256(str(Path(cell_dir).resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=str(lc.get("project", "diffrl-bench")), entity=lc.get("entity"),
                              mode=str(lc.get("mode", "offline")), dir=str(cell_dir), id=run_id, resume="allow",
                              name=cell_name, group=method, tags=list(lc.get("tags") or []) + ([grid] if grid else []),
                              config=plain(cfg), reinit=True)  # one run per cell, closed after it

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(_scalars(row), step=int(row["iteration"]))

    def close(self) -> None:
        self.run.finish()


def open_logger(cfg: DictConfig, cell_dir: Path, cell_name: str, method: str) -> MetricsLogger | None:
    name = logger_name(cfg)
    if name == "none":
        return None
    if name == "tensorboard":
        return TensorBoardLogger(cfg, cell_dir)
    if name == "wandb":
        return WandbLogger(cfg, cell_dir, cell_name, method)
    raise UserError(f"unknown logger '{name}'; valid: none, {', '.join(REQUIREMENTS)}")
