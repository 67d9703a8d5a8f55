"""GenEval reward (Ghosh et al. 2023): object counts, colours and positions checked by an object detector.

The detector is pluggable: `transformers` (any AutoModelForObjectDetection folder: DETR, Conditional/Deformable
DETR, YOLOS, RT-DETR, ...) or `mmdet` (GenEval's own Mask2Former config + checkpoint; optional extra). Prompts need
GenEval metadata (a JSONL prompt file with tag/include/exclude, e.g. experiments/prompts/geneval_style.jsonl).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bench.core.errors import UserError
from bench.rewards import REWARDS
from bench.rewards._clip_common import (clip_embeddings, clip_text_embeddings, load_clip, optional_import,
                                        require_module, require_path, reward_device)

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
Detection = tuple[str, float, Sequence[float]]  # (class name, score, [x1, y1, x2, y2] in pixels)


class TransformersDetector:
    """transformers AutoModelForObjectDetection run on device; DETR-style outputs (logits + normalised cxcywh boxes)."""

    def __init__(self, model: Any, size: Mapping[str, int], mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), scoring: str = "softmax"):
        self.model, self.size, self.mean, self.std = model.eval().requires_grad_(False), dict(size), mean, std
        # DETR/YOLOS score with a softmax over classes + "no object"; Deformable DETR/DINO/RT-DETR with sigmoids.
        if scoring not in ("softmax", "sigmoid"):
            raise UserError(f"world.reward_options.geneval.detector.scoring={scoring!r}; valid: softmax, sigmoid")
        self.scoring = scoring
        self.id2label = {int(k): v for k, v in model.config.id2label.items()}

    @classmethod
    def load(cls, cfg: Mapping[str, Any], device: torch.device) -> "TransformersDetector":
        """From a local folder (config, weights, preprocessor_config.json)."""
        from transformers import AutoModelForObjectDetection

        path = require_path(cfg, "model_path", "geneval", "an object detector (transformers folder)", "detector")
        try:
            model = AutoModelForObjectDetection.from_pretrained(str(path)).to(device)
        except (OSError, ValueError) as e:
            raise UserError(f"reward 'geneval': cannot load a transformers object detector from '{path}': "
                            f"{str(e).splitlines()[0]}") from e
        pcfg_file = Path(path) / "preprocessor_config.json"
        pcfg = json.loads(pcfg_file.read_text()) if pcfg_file.exists() else {}
        size = pcfg.get("size", {"shortest_edge": 800})
        size = size if isinstance(size, Mapping) else {"shortest_edge": int(size)}
        return cls(model, size, pcfg.get("image_mean", (0.485, 0.456, 0.406)),
                   pcfg.get("image_std", (0.229, 0.224, 0.225)), str(cfg.get("scoring", "softmax")))

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if "height" in self.size and "width" in self.size:
            out = (int(self.size["height"]), int(self.size["width"]))
        else:
            s = float(self.size.get("shortest_edge", min(h, w))) / min(h, w)
            if self.size.get("longest_edge"):
                s = min(s, float(self.size["longest_edge"]) / max(h, w))
            out = (round(h * s), round(w * s))
        return x if out == (h, w) else F.interpolate(x, size=out, mode="bilinear", align_corners=False, antialias=True)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[list[Detection]]:
        device = next(self.model.parameters()).device
        h, w = images.shape[-2:]
        x = self._resize(images.float().to(device))
        x = (x - torch.tensor(self.mean, device=device).view(1, -1, 1, 1)) / torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        out = self.model(pixel_values=x)
        logits, boxes = out.logits.float(), out.pred_boxes.float()
        if self.scoring == "sigmoid":
            scores, labels = logits.sigmoid().max(-1)
        else:
            scores, labels = logits.softmax(-1)[..., :-1].max(-1)
        cx, cy, bw, bh = boxes.unbind(-1)
        xyxy = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
        return [[(self.id2label.get(int(l), str(int(l))), float(s), b.tolist())
                 for s, l, b in zip(scores[i].cpu(), labels[i].cpu(), xyxy[i].cpu())] for i in range(len(images))]


class MMDetDetector:
    """GenEval's own detector (mmdetection Mask2Former) from a local config + checkpoint; optional extra."""

    def __init__(self, cfg: Mapping[str, Any], device: torch.device):
        """Build from config_path + checkpoint_path (mmdet 2.x or 3.x)."""
        apis = optional_import("mmdet.apis", "geneval", "mmdet (and mmcv), as GenEval installs them", "geneval")
        config = require_path(cfg, "config_path", "geneval", "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py",
                              "detector")
        ckpt = require_path(cfg, "checkpoint_path", "geneval", "the Mask2Former checkpoint (.pth)", "detector")
        self.apis = apis
        self.model = apis.init_detector(str(config), str(ckpt), device=str(device))
        meta = getattr(self.model, "dataset_meta", None) or {}
        self.classes = list(meta.get("classes") or getattr(self.model, "CLASSES", []))

    @classmethod
    def load(cls, cfg: Mapping[str, Any], device: torch.device) -> "MMDetDetector":
        """Same signature as TransformersDetector.load."""
        return cls(cfg, device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[list[Detection]]:
        # mmdet takes HWC BGR uint8 arrays in memory; nothing is written to disk.
        arrays = [a[..., ::-1].copy() for a in (images.float().clamp(0, 1) * 255).round().byte()
                  .permute(0, 2, 3, 1).cpu().numpy()]
        results = self.apis.inference_detector(self.model, arrays)
        dets = []
        for r in results:
            if hasattr(r, "pred_instances"):  # mmdet 3.x
                p = r.pred_instances
                dets.append([(self.classes[int(l)], float(s), b.tolist())
                             for b, s, l in zip(p.bboxes.cpu(), p.scores.cpu(), p.labels.cpu())])
            else:  # mmdet 2.x: (bbox per class [N, 5], masks)
                bbox = r[0] if isinstance(r, tuple) else r
                dets.append([(self.classes[c], float(row[4]), row[:4].tolist())
                             for c, arr in enumerate(bbox) for row in arr])
        return dets


DETECTORS = {"transformers": TransformersDetector, "mmdet": MMDetDetector}


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = 0.1) -> set[str]:
    """GenEval's relation of A to B from box centres, ignoring offsets within `threshold` x the summed box sizes."""
    boxes = np.array([box_a[:4], box_b[:4]], dtype=float).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


@REWARDS.register("geneval")
class GenEval:
    """Fraction of a prompt's GenEval requirements met (strict: 1 only if all are), from detector outputs.

    Options: detector {backend: transformers|mmdet, model_path | config_path + checkpoint_path, scoring},
    threshold (0.3), counting_threshold (0.9), max_objects (16), position_threshold (0.1), strict (true = the
    GenEval metric), color_model_path (a transformers CLIP folder; needed only for colour requirements).
    """

    @staticmethod
    def preflight(cfg: Mapping[str, Any]) -> None:
        """Before any cell starts (bench.runner.components.validate_cell; __init__ too): the detector backend is
        known and its files (transformers folder, or mmdet config + checkpoint and the mmdet package) and the
        colour CLIP folder exist."""
        dcfg = dict(cfg.get("detector") or {})
        backend = str(dcfg.get("backend", "transformers"))
        if backend not in DETECTORS:
            raise UserError(f"world.reward_options.geneval.detector.backend={backend!r}; valid: {', '.join(DETECTORS)}")
        if not dcfg.get("tiny") and not any(dcfg.get(k) for k in ("model_path", "config_path")):
            raise UserError("reward 'geneval' needs a local detector: set world.reward_options.geneval.detector."
                            "model_path=/path/to/detector (transformers) or detector.backend=mmdet with config_path "
                            "and checkpoint_path (GenEval's Mask2Former)")
        if not dcfg.get("tiny") and backend == "transformers":
            require_path(dcfg, "model_path", "geneval", "an object detector (transformers folder)", "detector")
        elif not dcfg.get("tiny"):
            require_module("mmdet.apis", "geneval", "mmdet (and mmcv), as GenEval installs them", "geneval")
            require_path(dcfg, "config_path", "geneval", "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py", "detector")
            require_path(dcfg, "checkpoint_path", "geneval", "the Mask2Former checkpoint (.pth)", "detector")
        if cfg.get("color_model_path") and not cfg.get("color_tiny"):
            require_path(cfg, "color_model_path", "geneval", "clip-vit-large-patch14")

    def __init__(self, world, cfg):
        self.world = world
        self.threshold = float(cfg.get("threshold", 0.3))
        self.counting_threshold = float(cfg.get("counting_threshold", 0.9))
        self.max_objects = int(cfg.get("max_objects", 16))
        self.position_threshold = float(cfg.get("position_threshold", 0.1))
        self.strict = bool(cfg.get("strict", True))
        self.preflight(cfg)
        dcfg = dict(cfg.get("detector") or {})
        backend = str(dcfg.get("backend", "transformers"))
        device = reward_device(world)
        self.detector = tiny_detector(dcfg) if dcfg.get("tiny") else DETECTORS[backend].load(dcfg, device)
        metas = world.all_metadata() if hasattr(world, "all_metadata") else []
        needs_color = any("color" in r for m in metas for r in m.get("include", []))
        self.color = None
        if cfg.get("color_model_path") or cfg.get("color_tiny"):
            ccfg = {"model_path": cfg.get("color_model_path"), "tiny": cfg.get("color_tiny", False)}
            self.color = load_clip(ccfg, "geneval", "clip-vit-large-patch14", torch.float32, device)
        elif needs_color:
            raise UserError("reward 'geneval': the prompt file has colour requirements; set world.reward_options."
                            "geneval.color_model_path=/path/to/clip-vit-large-patch14 (a transformers CLIP folder)")

    def _objects(self, dets: list[Detection], counting: bool) -> dict[str, list[tuple[Sequence[float], float]]]:
        thr = self.counting_threshold if counting else self.threshold
        objs: dict[str, list] = {}
        for name, score, box in sorted(dets, key=lambda d: -d[1]):
            if score > thr and len(objs.get(name, [])) < self.max_objects:
                objs.setdefault(name, []).append((box, score))
        return objs

    def _colors(self, image: torch.Tensor, boxes: list[Sequence[float]], classname: str) -> list[str]:
        """Zero-shot CLIP colour of each box crop (GenEval also masks the background with the instance mask;
        box crops are what a detector without masks gives)."""
        model, tok, prep = self.color
        h, w = image.shape[-2:]
        crops = []
        for b in boxes:
            x1, y1 = max(0, int(b[0])), max(0, int(b[1]))
            x2, y2 = min(w, max(x1 + 1, int(round(b[2])))), min(h, max(y1 + 1, int(round(b[3]))))
            crops.append(F.interpolate(image[None, :, y1:y2, x1:x2].float(), size=(prep.crop, prep.crop),
                                       mode="bicubic", align_corners=False).clamp(0, 1))
        img, _ = clip_embeddings(model, tok, prep, torch.cat(crops), None)
        txt = clip_text_embeddings(model, tok, [f"a photo of a {c} {classname}" for c in COLORS])
        return [COLORS[i] for i in (img @ txt.T).argmax(-1).tolist()]

    def score_one(self, image: torch.Tensor, dets: list[Detection], meta: Mapping[str, Any]) -> float:
        """GenEval's rules for one image: includes (count, colour, position) then excludes."""
        objects = self._objects(dets, meta.get("tag") == "counting")
        checks: list[bool] = []
        matched_groups: list[list | None] = []
        for req in meta.get("include", []):
            found = objects.get(req["class"], [])[: int(req["count"])]
            ok = len(found) >= int(req["count"])
            if ok and "color" in req:
                if self.color is None:
                    raise UserError("reward 'geneval': a colour requirement needs world.reward_options.geneval."
                                    "color_model_path")
                ok = self._colors(image, [b for b, _ in found], req["class"]).count(req["color"]) >= int(req["count"])
            if ok and "position" in req:
                rel, target = req["position"]
                group = matched_groups[int(target)] if int(target) < len(matched_groups) else None
                ok = group is not None and all(rel in relative_position(b, tb, self.position_threshold)
                                               for b, _ in found for tb, _ in group)
            matched_groups.append(found if ok else None)
            checks.append(ok)
        for req in meta.get("exclude", []):
            checks.append(len(objects.get(req["class"], [])) < int(req["count"]))
        if not checks:
            return 1.0
        return float(all(checks)) if self.strict else sum(checks) / len(checks)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        metas = []
        for p in prompts:
            meta = self.world.prompt_metadata(p) if hasattr(self.world, "prompt_metadata") else {}
            if not meta.get("include") and not meta.get("exclude"):
                raise UserError(f"reward 'geneval': prompt {p!r} has no GenEval metadata; use a JSONL prompt file "
                                "whose lines carry tag/include/exclude (e.g. geneval_style.jsonl)")
            metas.append(meta)
        dets = self.detector(images)
        return torch.tensor([self.score_one(images[i], dets[i], metas[i]) for i in range(len(prompts))],
                            device=images.device)


def tiny_detector(cfg: Mapping[str, Any]) -> TransformersDetector:
    """A random YOLOS detector with COCO-like class names, for tests and CPU smoke grids."""
    from transformers import YolosConfig, YolosForObjectDetection

    names = list(cfg.get("classes") or ["cat", "dog", "car", "cup", "book", "chair", "apple", "bird"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.get("tiny_seed", 0)))
        model = YolosForObjectDetection(YolosConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=[32, 32],
            patch_size=8, num_detection_tokens=8, num_labels=len(names),
            id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}))
    return TransformersDetector(model, {"height": 32, "width": 32})
