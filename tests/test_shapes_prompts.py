"""Shapes-world prompts: GenEval's six task types and metadata, the shipped split files, unknown-word errors,
and scenes that realise (or violate) each prompt by GenEval's own rules."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from bench.core.errors import UserError
from bench.worlds.prompts import PROMPTS_DIR, load_prompts
from bench.rewards.geneval_mini import check_requirements, scene_detections
from bench.worlds.shapes_prompts import TASKS, build_prompts, parse_prompt, prompt_file_text, scene_for, split_prompts
from bench.worlds.shapes_scene import CELL, RESOLUTION, render


def test_task_counts_and_geneval_metadata():
    prompts = build_prompts()
    # 3 shapes, 4 colours: 3 single, 6 ordered pairs, 3 x 4 counts, 4 x 3 colours, 6 x 4 relations, 6 x 12.
    assert Counter(m["tag"] for m in prompts) == {"single_object": 3, "two_object": 6, "counting": 12,
                                                 "colors": 12, "position": 24, "color_attr": 72}
    by = {m["prompt"]: m for m in prompts}
    assert by["three squares"]["include"] == [{"class": "square", "count": 3}]
    assert by["three squares"]["exclude"] == [{"class": "square", "count": 4}]
    # GenEval's position metadata: the reference object first, the located one points at it.
    assert by["a circle left of a triangle"]["include"] == [
        {"class": "triangle", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}]
    assert by["a red circle and a blue square"]["include"] == [
        {"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1, "color": "blue"}]


def test_shipped_prompt_files_match_the_code():
    for name in ("train", "eval"):
        assert (PROMPTS_DIR / f"shapes_{name}.jsonl").read_text() == prompt_file_text(name)
    train, evals = load_prompts("shapes_train.jsonl"), load_prompts("shapes_eval.jsonl")
    for p in train.prompts + evals.prompts:
        meta = {**(train.metadata.get(p) or evals.metadata[p])}
        assert meta == parse_prompt(p)
    tr, ev = split_prompts(build_prompts())
    held = {m["prompt"] for m in ev if m["tag"] in ("two_object", "position", "color_attr", "counting")}
    assert held and not held & {m["prompt"] for m in tr}  # compositional eval prompts are unseen in RL training
    assert {m["tag"] for m in ev} == set(TASKS)


def test_unknown_words_are_one_line_errors():
    with pytest.raises(UserError, match="unknown word 'dog'") as e:
        parse_prompt("a red dog")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not one of the six GenEval templates"):
        parse_prompt("a circle and a circle")
    assert parse_prompt("  A Red   Circle ")["tag"] == "colors"


def test_scenes_realise_or_violate_every_prompt():
    rng = np.random.default_rng(5)
    for meta in build_prompts():
        for faithful in (True, False):
            scene = scene_for(meta, rng, faithful)
            assert 1 <= len(scene) <= 4 and len({o.cell for o in scene}) == len(scene)
            ok = all(check_requirements(meta, scene_detections(scene)))
            assert ok == faithful, (meta["prompt"], faithful, scene)
            for o in scene:  # inside its cell with the cell's last row and column empty: objects never touch
                assert o.dx + o.size <= CELL - 1 and o.dy + o.size <= CELL - 1
    assert render(scene).shape == (3, RESOLUTION, RESOLUTION)
