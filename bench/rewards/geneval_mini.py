"""GenEval-mini: GenEval's rules (Ghosh et al. 2023) over an exact detector for the shapes world's renders.

The detector is colour segmentation (each pixel to its nearest palette colour, or background) + 4-connected
components + shape classification from the component's box fill and top/bottom asymmetry. The rules are
GenEval's evaluate_images.py: per include requirement, the first `count` objects of the class must exist, have
the colour (colour tasks) and stand in the relation to every object of the referenced group (position, by
bench.rewards.geneval.relative_position); excludes need fewer than `count`. Strict = all met (the GenEval
number); partial = the fraction met. GenEval orders a class's objects by detector confidence; an exact detector
has none, so objects of the required colour come first (the score then reads "count objects of that class and
colour exist").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from bench.core.errors import UserError
from bench.rewards import REWARDS
from bench.rewards.geneval import relative_position
from bench.core.schema import Configurable, Option
from bench.worlds.shapes_prompts import parse_prompt
from bench.worlds.shapes_scene import PALETTE, Obj

_NAMES = ("background",) + tuple(PALETTE)
_RGB = np.array([(0.0, 0.0, 0.0)] + list(PALETTE.values()), np.float32)


@dataclass(frozen=True)
class Detection:
    """One detected object: shape ('other' for a malformed blob), colour and [x1, y1, x2, y2] box in pixels."""

    shape: str
    color: str
    box: tuple[float, float, float, float]
    area: int = 0


def classify_shape(mask: np.ndarray, max_side: int = 9) -> str:
    """circle | square | triangle | other, from a component's mask cropped to its box."""
    h, w = mask.shape
    if max(h, w) > max_side or min(h, w) < 0.6 * max(h, w):
        return "other"  # merged or smeared blobs: GenEval's detector would not call them an object either
    fill = mask.mean()
    half = h // 2
    asym = mask[h - half:].mean() - mask[:half].mean()
    if asym > 0.25:
        return "triangle"
    return "square" if fill > 0.87 else "circle"


def detect(image: torch.Tensor | np.ndarray, min_area: int = 12, color_tolerance: float = 0.45) -> list[Detection]:
    """Objects in one RGB image [3, H, W] in [0, 1]."""
    from scipy import ndimage  # here: planning a grid imports every reward module, and scipy.ndimage is 0.7 s

    img = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, np.float32)
    pix = img.transpose(1, 2, 0)
    dist = np.linalg.norm(pix[:, :, None, :] - _RGB[None, None], axis=-1)
    label = dist.argmin(-1)
    label[dist.min(-1) > color_tolerance] = 0  # off-palette pixels count as background
    out: list[Detection] = []
    for ci in range(1, len(_NAMES)):
        comps, _ = ndimage.label(label == ci)  # 4-connectivity
        for k, sl in enumerate(ndimage.find_objects(comps), 1):
            m = comps[sl] == k  # the box may hold pixels of another component of this colour
            if m.sum() < min_area:
                continue
            y0, x0 = sl[0].start, sl[1].start
            out.append(Detection(classify_shape(m), _NAMES[ci],
                                 (float(x0), float(y0), float(sl[1].stop), float(sl[0].stop)), int(m.sum())))
    return out


def scene_detections(scene: Sequence[Obj]) -> list[Detection]:
    """The ground truth of a rendered scene in detector form (what a perfect detector returns)."""
    return [Detection(o.shape, o.color, o.box, 0) for o in scene]


def check_requirements(meta: Mapping[str, Any], dets: Sequence[Detection], position_threshold: float = 0.1
                       ) -> list[bool]:
    """GenEval's per-requirement outcomes (includes in order, then excludes)."""
    checks: list[bool] = []
    matched: list[list[Detection] | None] = []
    for req in meta.get("include", []):
        cands = [d for d in dets if d.shape == req["class"]]
        count = int(req["count"])
        if "color" in req:
            cands.sort(key=lambda d: d.color != req["color"])  # stable: matching colour first
        found = cands[:count]
        ok = len(found) >= count
        if ok and "color" in req:
            ok = sum(d.color == req["color"] for d in found) >= count
        if ok and "position" in req:
            rel, target = req["position"][0], int(req["position"][1])
            group = matched[target] if target < len(matched) else None
            ok = group is not None and all(rel in relative_position(d.box, g.box, position_threshold)
                                           for d in found for g in group)
        matched.append(found if ok else None)
        checks.append(ok)
    for req in meta.get("exclude", []):
        checks.append(sum(d.shape == req["class"] for d in dets) < int(req["count"]))
    return checks


def strict_and_partial(checks: Sequence[bool]) -> tuple[float, float]:
    """GenEval's score (all requirements met) and the partial-credit fraction."""
    if not checks:
        return 1.0, 1.0
    return float(all(checks)), sum(checks) / len(checks)


@REWARDS.register("geneval_mini")
class GenEvalMini(Configurable):
    """GenEval's strict (or partial-credit) score of shapes-world images, from the exact detector."""

    GROUP = "world.reward_options.geneval_mini"
    OPTIONS = {
        "strict": Option(True, bool, help="true: 1 only if every requirement is met (GenEval); false: fraction met"),
        "min_area": Option(12, int, low=1, help="pixels below which a component is noise, not an object"),
        "color_tolerance": Option(0.45, float, low=0, low_open=True,
                                  help="RGB distance beyond which a pixel matches no palette colour"),
        "position_threshold": Option(0.1, float, low=0, help="GenEval's relative-position dead zone"),
    }

    def __init__(self, world: Any, cfg: Mapping[str, Any] | None = None):
        self.world = world
        self.cfg = self.resolve_options(cfg or {})

    def metadata(self, prompt: str) -> Mapping[str, Any]:
        """The prompt's GenEval metadata: from the prompt file, else parsed (one-line error for unknown words)."""
        meta = self.world.prompt_metadata(prompt) if hasattr(self.world, "prompt_metadata") else {}
        return meta if meta.get("include") else parse_prompt(prompt)

    def checks(self, image: torch.Tensor, prompt: str) -> list[bool]:
        """GenEval's requirement outcomes for one image."""
        dets = detect(image, int(self.cfg["min_area"]), float(self.cfg["color_tolerance"]))
        return check_requirements(self.metadata(prompt), dets, float(self.cfg["position_threshold"]))

    def scores(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(strict, partial) per image."""
        if len(images) != len(prompts):
            raise UserError(f"reward 'geneval_mini': {len(images)} images for {len(prompts)} prompts")
        pairs = [strict_and_partial(self.checks(images[i], p)) for i, p in enumerate(prompts)]
        t = torch.tensor(pairs, dtype=torch.float32).reshape(-1, 2)
        return t[:, 0], t[:, 1]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        strict, partial = self.scores(images, prompts)
        return (strict if self.cfg["strict"] else partial).to(images.device)
