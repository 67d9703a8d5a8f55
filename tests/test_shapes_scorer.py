"""GenEval-mini's exact scorer: hand-checked rules, exact detections, and >= 99% agreement with ground truth.

Ground truth is GenEval's rules applied to a scene's own objects (shape, colour, box known by construction);
the scorer sees only the rendered pixels. Held-out scenes come from a seed no training code uses.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.core.errors import UserError
from bench.rewards.geneval_mini import (GenEvalMini, check_requirements, classify_shape, detect, scene_detections,
                                        strict_and_partial)
from bench.worlds.shapes_prompts import TASKS, build_prompts, parse_prompt, scene_for
from bench.worlds.shapes_scene import Obj, render, shape_mask

HELD_OUT_SEED = 2026


def score(prompt: str, scene: list[Obj]) -> tuple[float, float]:
    return strict_and_partial(check_requirements(parse_prompt(prompt), detect(render(scene))))


def test_rules_by_hand():
    # Cells are row-major in a 3 x 3 grid: 0 top-left, 2 top-right, 6 bottom-left.
    circle_left = [Obj("circle", "red", 0), Obj("square", "blue", 2)]
    assert score("a circle left of a square", circle_left) == (1.0, 1.0)
    assert score("a circle right of a square", circle_left) == (0.0, 0.5)  # the square is there, the relation not
    assert score("a square right of a circle", circle_left) == (1.0, 1.0)
    assert score("a circle above a square", [Obj("circle", "red", 1), Obj("square", "red", 7)]) == (1.0, 1.0)
    # Diagonal neighbours: the centre offset (8, 8) has dx = dy = 0.707 > 0.5 (GenEval's cones), so both hold.
    diag = [Obj("circle", "red", 0), Obj("square", "red", 4)]
    assert score("a circle left of a square", diag) == (1.0, 1.0)
    assert score("a circle above a square", diag) == (1.0, 1.0)
    three = [Obj("circle", "green", c) for c in (0, 4, 8)]
    assert score("three circles", three) == (1.0, 1.0)
    assert score("two circles", three) == (0.0, 0.5)   # include met, exclude ("fewer than 3") not
    assert score("four circles", three) == (0.0, 0.5)  # include not met, exclude met
    swapped = [Obj("circle", "blue", 0), Obj("square", "red", 5)]
    assert score("a red circle and a blue square", swapped) == (0.0, 0.0)
    assert score("a blue circle and a red square", swapped) == (1.0, 1.0)
    assert score("a blue circle and a green square", swapped) == (0.0, 0.5)
    assert score("a circle and a triangle", swapped) == (0.0, 0.5)


def test_shape_classifier_on_every_rendered_mask():
    for shape in ("circle", "square", "triangle"):
        for size in (6, 7):
            assert classify_shape(shape_mask(shape, size)) == shape
    assert classify_shape(np.ones((7, 15), bool)) == "other"  # two merged squares are not an object


def test_detections_equal_the_scene():
    rng = np.random.default_rng(HELD_OUT_SEED + 1)
    prompts = build_prompts()
    for _ in range(200):
        scene = scene_for(prompts[int(rng.integers(len(prompts)))], rng, bool(rng.random() < 0.5))
        got = sorted((d.shape, d.color, d.box) for d in detect(render(scene)))
        assert got == sorted((d.shape, d.color, d.box) for d in scene_detections(scene))


def test_agreement_with_ground_truth_per_task(capsys):
    """>= 99% strict-score agreement on held-out scenes (half faithful, half violating), clean and with noise."""
    rng = np.random.default_rng(HELD_OUT_SEED)
    gen = torch.Generator().manual_seed(HELD_OUT_SEED)
    by_task = {t: [m for m in build_prompts() if m["tag"] == t] for t in TASKS}
    table = {(t, noisy): np.zeros((2, 2), int) for t in TASKS for noisy in (False, True)}
    for task in TASKS:
        for i in range(100):
            meta = by_task[task][int(rng.integers(len(by_task[task])))]
            scene = scene_for(meta, rng, faithful=i % 2 == 0)
            truth = strict_and_partial(check_requirements(meta, scene_detections(scene)))[0]
            img = render(scene)
            for noisy in (False, True):
                x = (img + 0.08 * torch.randn(img.shape, generator=gen)).clamp(0, 1) if noisy else img
                pred = strict_and_partial(check_requirements(meta, detect(x)))[0]
                table[task, noisy][int(truth), int(pred)] += 1
    lines = ["task          noise  truth1/pred1 truth1/pred0 truth0/pred1 truth0/pred0  agreement"]
    agree = total = 0
    for (task, noisy), m in table.items():
        a = (m[0, 0] + m[1, 1]) / m.sum()
        agree, total = agree + m[0, 0] + m[1, 1], total + m.sum()
        lines.append(f"{task:13s} {str(noisy):6s} {m[1, 1]:12d} {m[1, 0]:12d} {m[0, 1]:12d} {m[0, 0]:12d}  {a:.3f}")
        assert m[1].sum() > 0 and m[0].sum() > 0, "both outcomes must be tested"
        assert a >= 0.97, (task, noisy, m)
    lines.append(f"overall agreement {agree / total:.4f} on {total} scored images")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert agree / total >= 0.99


def test_reward_strict_and_partial_and_errors():
    class W:
        def prompt_metadata(self, prompt):
            return {}

    images = torch.stack([render([Obj("circle", "red", 0), Obj("square", "green", 2)])] * 2)
    prompts = ["a red circle and a blue square", "a circle left of a square"]
    assert GenEvalMini(W(), {})(images, prompts).tolist() == [0.0, 1.0]
    assert GenEvalMini(W(), {"strict": False})(images, prompts).tolist() == [0.5, 1.0]
    with pytest.raises(UserError, match="unknown word 'dog'"):
        GenEvalMini(W(), {})(images[:1], ["a red dog"])
    with pytest.raises(UserError, match="min_area"):
        GenEvalMini(W(), {"min_area": 0})
