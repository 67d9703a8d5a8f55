"""Checks of the training options that need this machine (its environment, its files), run before any cell."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench.training.precision import check_launch
from bench.worlds.sd3_lora_export import check_exported


def check_training(train: Mapping[str, Any]) -> None:
    """UserError (one line) when accelerate launch's --mixed_precision contradicts train.mixed_precision, or
    train.init_lora names no readable LoRA file."""
    check_launch(str(train.get("mixed_precision", "no")))
    if train.get("init_lora"):
        check_exported(train["init_lora"])
