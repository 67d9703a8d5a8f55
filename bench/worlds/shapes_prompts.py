"""Prompts of the shapes world in GenEval's six task types, with GenEval's metadata, and scenes that realise them.

GenEval (Ghosh et al. 2023, arXiv 2310.11513) tags each prompt single_object, two_object, counting, colors,
position or color_attr and lists `include` requirements ({class, count, color?, position: [relation, index]})
and `exclude` ones ({class, count}: fewer than count). The same metadata drives the scorer and the renderer.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Mapping

import numpy as np

from bench.core.errors import UserError
from bench.worlds.shapes_scene import COLORS, GRID, PLURALS, SHAPES, Obj, random_obj

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = ("one", "two", "three", "four")
RELATIONS = ("left of", "right of", "above", "below")
VOCABULARY = frozenset({"a", "and", "of", "left", "right", "above", "below", *NUMBERS, *SHAPES,
                        *PLURALS.values(), *COLORS})
# Tasks whose prompts are split into train and held-out eval compositions; the others have too few prompts
# (3 and 12) to hold any out and appear in both (GenEval's own single-object and colour prompts are as few).
SPLIT_TASKS = ("two_object", "position", "color_attr", "counting")


def build_prompts() -> list[dict[str, Any]]:
    """Every prompt of the world, GenEval-style: {"tag", "include", ["exclude"], "prompt"}."""
    out: list[dict[str, Any]] = []
    for s in SHAPES:
        out.append({"tag": "single_object", "include": [{"class": s, "count": 1}], "prompt": f"a {s}"})
    for a in SHAPES:
        for b in SHAPES:
            if a != b:
                out.append({"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                            "prompt": f"a {a} and a {b}"})
    for s in SHAPES:
        for n, word in enumerate(NUMBERS, 1):
            noun = s if n == 1 else PLURALS[s]
            out.append({"tag": "counting", "include": [{"class": s, "count": n}],
                        "exclude": [{"class": s, "count": n + 1}], "prompt": f"{word} {noun}"})
    for c in COLORS:
        for s in SHAPES:
            out.append({"tag": "colors", "include": [{"class": s, "count": 1, "color": c}], "prompt": f"a {c} {s}"})
    for a in SHAPES:
        for b in SHAPES:
            if a != b:
                for rel in RELATIONS:
                    out.append({"tag": "position", "include": [{"class": b, "count": 1},
                                                               {"class": a, "count": 1, "position": [rel, 0]}],
                                "prompt": f"a {a} {rel} a {b}"})
    for a in SHAPES:
        for b in SHAPES:
            if a == b:
                continue
            for c1 in COLORS:
                for c2 in COLORS:
                    if c1 != c2:
                        out.append({"tag": "color_attr", "include": [{"class": a, "count": 1, "color": c1},
                                                                     {"class": b, "count": 1, "color": c2}],
                                    "prompt": f"a {c1} {a} and a {c2} {b}"})
    return out


_SINGLE = re.compile(rf"^a ({'|'.join(SHAPES)})$")
_TWO = re.compile(rf"^a ({'|'.join(SHAPES)}) and a ({'|'.join(SHAPES)})$")
_COUNT = re.compile(rf"^({'|'.join(NUMBERS)}) (\w+)$")
_COLOR = re.compile(rf"^a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})$")
_POS = re.compile(rf"^a ({'|'.join(SHAPES)}) ({'|'.join(RELATIONS)}) a ({'|'.join(SHAPES)})$")
_ATTR = re.compile(rf"^a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) and a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})$")
_BY_PROMPT = {m["prompt"]: m for m in build_prompts()}


def parse_prompt(prompt: str) -> dict[str, Any]:
    """A prompt's GenEval metadata; one-line UserError for unknown words or a sentence outside the six templates."""
    words = prompt.strip().lower().split()
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        raise UserError(f"shapes prompt {prompt!r}: unknown word {unknown[0]!r}; known words: "
                        f"{', '.join(sorted(VOCABULARY))}")
    text = " ".join(words)
    if text in _BY_PROMPT:
        return {k: v for k, v in _BY_PROMPT[text].items() if k != "prompt"}
    raise UserError(f"shapes prompt {prompt!r}: not one of the six GenEval templates ('a circle', 'a circle and a "
                    "square', 'three circles', 'a red circle', 'a circle left of a square', 'a red circle and a blue "
                    "square', with two different shapes and colours)")


def split_prompts(prompts: list[dict[str, Any]], eval_fraction: float = 0.34, seed: int = 0
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval): a stable hash split of SPLIT_TASKS' prompts; the other tasks' prompts go to both."""
    train, evals = [], []
    for m in prompts:
        if m["tag"] not in SPLIT_TASKS:
            train.append(m)
            evals.append(m)
            continue
        h = int.from_bytes(hashlib.sha256(f"{seed}:{m['prompt']}".encode()).digest()[:8], "big") / 2**64
        (evals if h < eval_fraction else train).append(m)
    return train, evals


def prompt_file_text(split: str) -> str:
    """The JSONL text of experiments/prompts/shapes_{train,eval}.jsonl (regenerated by `python -m
    bench.worlds.shapes_prompts`; a test checks the shipped files match)."""
    train, evals = split_prompts(build_prompts())
    rows = {"train": train, "eval": evals}[split]
    return "".join(json.dumps({k: m[k] for k in ("tag", "include", "exclude", "prompt") if k in m}) + "\n"
                   for m in rows)


# -- scenes that realise (or, for label noise, violate) a prompt ----------------------------------------------
def _pair_cells(rng: np.random.Generator, rel: str) -> tuple[int, int]:
    """Cells (a, b) with a `rel` b: same row for left/right, same column for above/below."""
    lo, hi = sorted(rng.choice(GRID, 2, replace=False).tolist())
    k = int(rng.integers(GRID))
    first, second = ((k * GRID + lo, k * GRID + hi) if rel in ("left of", "right of")
                     else (lo * GRID + k, hi * GRID + k))
    return (first, second) if rel in ("left of", "above") else (second, first)


def scene_for(meta: Mapping[str, Any], rng: np.random.Generator, faithful: bool = True) -> list[Obj]:
    """A random scene meeting every requirement of `meta`, or (faithful=False) violating the task's one."""
    tag, inc = meta["tag"], meta["include"]
    cells = rng.permutation(GRID * GRID).tolist()
    if tag == "single_object":
        shape = inc[0]["class"] if faithful else str(rng.choice([s for s in SHAPES if s != inc[0]["class"]]))
        return [random_obj(rng, cells[0], shape)]
    if tag == "two_object":
        a, b = inc[0]["class"], inc[1]["class"]
        if not faithful:
            # One of the two is missing: drawn as a duplicate of the other or as the third shape.
            b = str(rng.choice([s for s in SHAPES if s != b]))
        return [random_obj(rng, cells[0], a), random_obj(rng, cells[1], b)]
    if tag == "counting":
        n = int(inc[0]["count"])
        if not faithful:
            n = int(rng.choice([k for k in range(1, len(NUMBERS) + 1) if k != n]))
        return [random_obj(rng, cells[i], inc[0]["class"]) for i in range(n)]
    if tag == "colors":
        color = inc[0]["color"] if faithful else str(rng.choice([c for c in COLORS if c != inc[0]["color"]]))
        return [random_obj(rng, cells[0], inc[0]["class"], color)]
    if tag == "position":
        b, a, rel = inc[0]["class"], inc[1]["class"], inc[1]["position"][0]
        if not faithful:
            rel = str(rng.choice([r for r in RELATIONS if r != rel]))
        ca, cb = _pair_cells(rng, rel)
        return [random_obj(rng, ca, a), random_obj(rng, cb, b)]
    if tag == "color_attr":
        (a, c1), (b, c2) = (inc[0]["class"], inc[0]["color"]), (inc[1]["class"], inc[1]["color"])
        if not faithful:
            if rng.random() < 0.5:
                c1, c2 = c2, c1  # the attribute-binding error: colours swapped between the objects
            else:
                c1 = str(rng.choice([c for c in COLORS if c != c1]))
        return [random_obj(rng, cells[0], a, c1), random_obj(rng, cells[1], b, c2)]
    raise ValueError(f"unknown GenEval tag {tag!r}")


if __name__ == "__main__":
    from bench.worlds.prompts import PROMPTS_DIR

    for name in ("train", "eval"):
        (PROMPTS_DIR / f"shapes_{name}.jsonl").write_text(prompt_file_text(name))
