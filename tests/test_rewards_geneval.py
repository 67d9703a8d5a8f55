"""GenEval reward: the rules on hand-made detections, a transformers detector (tiny random YOLOS saved to disk)
checked against transformers' own post-processing, and the errors for missing detectors/metadata/extras."""
from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from bench.core.errors import UserError
from bench.rewards.geneval import GenEval, TransformersDetector, relative_position, tiny_detector

META = {
    "a photo of two cats": {"tag": "counting", "include": [{"class": "cat", "count": 2}],
                            "exclude": [{"class": "cat", "count": 3}]},
    "a photo of a cat left of a dog": {"tag": "position", "include": [
        {"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]},
    "a photo of a cup and a book": {"tag": "two_object", "include": [{"class": "cup", "count": 1},
                                                                     {"class": "book", "count": 1}]},
}


class _World:
    device = torch.device("cpu")

    def prompt_metadata(self, p):
        return META.get(p, {})

    def all_metadata(self):
        return list(META.values())


def _reward(**cfg):
    return GenEval(_World(), {"detector": {"tiny": True}, **cfg})


def test_relative_position():
    # Centres 40 px apart horizontally, 10 px boxes: clearly left of / right of.
    assert relative_position([0, 0, 10, 10], [40, 0, 50, 10]) == {"left of"}
    assert relative_position([40, 0, 50, 10], [0, 0, 10, 10]) == {"right of"}
    assert relative_position([0, 40, 10, 50], [0, 0, 10, 10]) == {"below"}  # image y grows downwards
    # Diagonal: both components above 0.5 of the unit offset.
    assert relative_position([0, 0, 10, 10], [40, 40, 50, 50]) == {"left of", "above"}
    # Overlapping boxes within the threshold margin: no relation.
    assert relative_position([0, 0, 100, 100], [5, 0, 105, 100]) == set()


def test_rules_on_detections():
    r = _reward()
    img = torch.zeros(3, 32, 32)
    cat = lambda x, s=0.95: ("cat", s, [x, 10, x + 8, 18])  # noqa: E731
    two_cats = META["a photo of two cats"]
    assert r.score_one(img, [cat(0), cat(20)], two_cats) == 1.0
    assert r.score_one(img, [cat(0), cat(10), cat(20)], two_cats) == 0.0          # three: the exclude fails
    assert r.score_one(img, [cat(0), cat(20, 0.5)], two_cats) == 0.0              # counting threshold is 0.9
    pos = META["a photo of a cat left of a dog"]
    dog = ("dog", 0.8, [22, 10, 30, 18])
    assert r.score_one(img, [cat(0), dog], pos) == 1.0
    assert r.score_one(img, [cat(24), ("dog", 0.8, [0, 10, 8, 18])], pos) == 0.0
    assert r.score_one(img, [cat(0)], pos) == 0.0                                 # no dog: nothing to be left of
    partial = _reward(strict=False)
    assert partial.score_one(img, [("cup", 0.5, [0, 0, 5, 5])], META["a photo of a cup and a book"]) == 0.5
    assert r.score_one(img, [("cup", 0.5, [0, 0, 5, 5])], META["a photo of a cup and a book"]) == 0.0
    assert r.score_one(img, [("cup", 0.2, [0, 0, 5, 5]), ("book", 0.9, [9, 9, 20, 20])],
                       META["a photo of a cup and a book"]) == 0.0               # cup below the 0.3 threshold


def test_transformers_detector_from_disk_matches_transformers_postprocessing(tmp_path):
    from transformers import YolosImageProcessorPil

    tiny = tiny_detector({})
    tiny.model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "YolosImageProcessor", "size": {"height": 32, "width": 32},
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    det = TransformersDetector.load({"model_path": str(tmp_path)}, torch.device("cpu"))
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    ours = det(images)
    x = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = det.model(pixel_values=x)
    ref = YolosImageProcessorPil().post_process_object_detection(out, threshold=0.0, target_sizes=[(48, 48)] * 2)
    for mine, theirs in zip(ours, ref):
        order = torch.tensor([s for _, s, _ in mine]).argsort(descending=True)
        torch.testing.assert_close(torch.tensor([mine[i][1] for i in order]), theirs["scores"].sort(descending=True).values)
        boxes = torch.tensor([b for _, _, b in mine])
        # Same boxes as a set (transformers' ordering may differ).
        for b in theirs["boxes"]:
            assert (boxes - b).abs().max(1).values.min() < 1e-4
        assert {tiny.id2label[int(l)] for l in theirs["labels"]} <= set(tiny.id2label.values())
        assert all(name in tiny.id2label.values() for name, _, _ in mine)


def test_scores_a_batch_with_metadata():
    r = _reward(strict=False)
    prompts = list(META)
    scores = r(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)), prompts)
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()
    with pytest.raises(UserError, match="prompt 'a horse' has no GenEval metadata"):
        r(torch.rand(1, 3, 32, 32), ["a horse"])


def test_missing_detector_colour_model_and_extras(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="reward 'geneval' needs a local detector: set world.reward_options.geneval."
                                        "detector.model_path="):
        GenEval(_World(), {})
    with pytest.raises(UserError, match=r"detector.model_path='.*nowhere' does not exist"):
        GenEval(_World(), {"detector": {"model_path": str(tmp_path / "nowhere")}})
    with pytest.raises(UserError, match="detector.backend='yolo'; valid: transformers, mmdet"):
        GenEval(_World(), {"detector": {"backend": "yolo", "model_path": "x"}})
    colour = SimpleNamespace(device=torch.device("cpu"),
                             all_metadata=lambda: [{"include": [{"class": "car", "count": 1, "color": "red"}]}])
    with pytest.raises(UserError, match="colour requirements; set world.reward_options.geneval.color_model_path"):
        GenEval(colour, {"detector": {"tiny": True}})
    assert GenEval(colour, {"detector": {"tiny": True}, "color_tiny": True}).color is not None
    if importlib.util.find_spec("mmdet") is None:
        with pytest.raises(UserError, match=r"needs the optional package 'mmdet.*docs/sd3.md, \"GenEval's detector\""):
            GenEval(_World(), {"detector": {"backend": "mmdet", "config_path": "c.py", "checkpoint_path": "c.pth"}})
