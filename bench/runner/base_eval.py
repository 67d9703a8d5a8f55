"""The grid's base-model eval reused as every matching cell's iteration 0 (one eval per grid, not one per cell).

Two evals of the untrained policy give the same figures when the world section of the cell identity is the same
(model, weights, LoRA init at B = 0, prompts, reward, eval protocol: world.eval is inside it; the cell seed, the
methods and the training knobs never reach world.evaluate) and when evaluating draws nothing from the global
random streams, so skipping it leaves every later number of the cell unchanged. The base task records both: the
key (a hash of the world identity) and whether its evaluate left torch's, numpy's and Python's global generators
untouched; a cell reuses the figures only when its key matches and the eval was measured to be neutral.
"""
from __future__ import annotations

import hashlib
import json
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from bench.runner import store
from bench.runner.resolve import identity

KEY_FILE = "eval_key.json"


def base_eval_key(cfg: Any) -> str:
    """12 hex digits of the hash of the cell's world identity: equal keys, equal base-model evals."""
    text = json.dumps(identity(cfg).get("world"), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _rng_state() -> tuple[Any, ...]:
    cuda = [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return torch.get_rng_state().clone(), cuda, np.random.get_state(), random.getstate()


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    np_a, np_b = a[2], b[2]
    return (torch.equal(a[0], b[0]) and len(a[1]) == len(b[1]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
            and np_a[0] == np_b[0] and np.array_equal(np_a[1], np_b[1]) and tuple(np_a[2:]) == tuple(np_b[2:])
            and a[3] == b[3])


@contextmanager
def neutrality() -> Iterator[dict[str, bool]]:
    """{"neutral": bool} filled on exit: whether the block left every global random generator as it found it."""
    out = {"neutral": False}
    before = _rng_state()
    yield out
    out["neutral"] = _same(before, _rng_state())


def write_key(folder: Path, cfg: Any, neutral: bool) -> None:
    """Record the base eval's key and neutrality (before its metrics.json: metrics present means key present)."""
    store.atomic_write_text(Path(folder) / KEY_FILE, json.dumps({"key": base_eval_key(cfg), "rng_neutral": neutral}))


def reusable_base_eval(cfg: Any, folder: Path, metrics_file: Path) -> dict[str, Any] | None:
    """{"metrics", "samples"} of the base eval in `folder` if a cell of config `cfg` may take it as its iteration 0;
    None otherwise (no base eval yet, another world config, or an eval that draws from the global generators)."""
    key_path = Path(folder) / KEY_FILE
    if not (key_path.exists() and Path(metrics_file).exists()):
        return None
    key = json.loads(key_path.read_text())
    if key.get("key") != base_eval_key(cfg) or not key.get("rng_neutral"):
        return None
    return {"metrics": json.loads(Path(metrics_file).read_text()),
            "samples": sorted(str(p) for p in Path(folder).glob("*_base.png"))}
