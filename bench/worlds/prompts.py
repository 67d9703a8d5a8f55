"""Prompt sets: plain text (one prompt per line) or JSONL (one object per line with a "prompt" key and metadata)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from bench.core.errors import UserError

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "experiments" / "prompts"


@dataclass
class PromptSet:
    """Prompts in file order plus per-prompt metadata (e.g. GenEval's tag/include/exclude), keyed by prompt text."""

    prompts: list[str]
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


def resolve_prompt_path(path: str | Path) -> Path:
    """An existing path as given, else relative to experiments/prompts/ (so configs can say `geneval_mini.jsonl`)."""
    p = Path(str(path)).expanduser()
    if p.exists():
        return p
    shipped = PROMPTS_DIR / str(path)
    if shipped.exists():
        return shipped
    options = sorted(q.name for q in PROMPTS_DIR.glob("*") if q.suffix in (".txt", ".jsonl"))
    raise UserError(f"prompt file '{path}' not found (looked at {p.resolve()} and {shipped}); "
                    f"give a .txt (one prompt per line) or .jsonl path, or one of: {', '.join(options)}")


def load_prompts(path: str | Path) -> PromptSet:
    """Read a .txt (blank lines and '#' comments skipped) or .jsonl file ({"prompt": ..., any metadata})."""
    p = resolve_prompt_path(path)
    prompts: list[str] = []
    meta: dict[str, dict[str, Any]] = {}
    lines = p.read_text(encoding="utf-8").splitlines()
    jsonl = p.suffix == ".jsonl"
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line or (not jsonl and line.startswith("#")):
            continue
        if jsonl:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{i}: not valid JSON ({e.msg}); JSONL prompt files hold one object per line") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise UserError(f"{p}:{i}: each JSONL line needs a string \"prompt\" field")
            text = obj["prompt"].strip()
            meta[text] = {k: v for k, v in obj.items() if k != "prompt"}
        else:
            text = line
        prompts.append(text)
    if not prompts:
        raise UserError(f"prompt file '{p}' holds no prompts")
    return PromptSet(prompts, meta)


def _in_eval(prompt: str, fraction: float, seed: int) -> bool:
    # A hash split is stable when the file grows: a prompt never moves between train and eval.
    h = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def train_eval_split(cfg: Mapping[str, Any]) -> tuple[PromptSet, PromptSet]:
    """`world.prompts` -> (train, eval): separate files (`train`, `eval`), or one file split by `eval_fraction`."""
    cfg = dict(cfg or {})
    if not cfg.get("train"):
        raise UserError("world.prompts.train is not set; give a prompt file (.txt or .jsonl)")
    train = load_prompts(cfg["train"])
    if cfg.get("eval"):
        evals = load_prompts(cfg["eval"])
    else:
        frac, seed = float(cfg.get("eval_fraction", 0.1)), int(cfg.get("split_seed", 0))
        if not 0.0 <= frac < 1.0:
            raise UserError(f"world.prompts.eval_fraction={frac} must be in [0, 1)")
        uniq = list(dict.fromkeys(train.prompts))
        held = {q for q in uniq if _in_eval(q, frac, seed)}
        if frac > 0 and not held:
            held = {uniq[-1]}
        if len(held) == len(uniq):
            raise UserError(f"world.prompts.eval_fraction={frac} leaves no training prompts in '{cfg['train']}'")
        evals = PromptSet([q for q in uniq if q in held], {q: train.metadata[q] for q in held if q in train.metadata})
        train = PromptSet([q for q in train.prompts if q not in held],
                          {q: m for q, m in train.metadata.items() if q not in held})
    n_eval = cfg.get("eval_max")
    if n_eval is not None:
        evals = PromptSet(evals.prompts[: int(n_eval)], evals.metadata)
    if not evals.prompts:
        # No held-out prompts requested: evaluate on the first training prompts (said so in docs/sd3.md).
        evals = PromptSet(train.prompts[: int(n_eval or 8)], train.metadata)
    return train, evals
