"""The shapes world: GenEval in miniature on the sd3 world's code (docs/shapes.md).

SD3Transformer2DModel (joint attention over text tokens) in pixel space at 24 px, the sd3 text path with two tiny
frozen CLIP encoders and offline tokenizers, CFG, peft LoRA: bench.worlds.sd3.SD3World with `variant: tiny`,
the shapes architecture in `world.tiny`, and the shipped pretrained base weights. Rewards: GenEval-mini
(bench/rewards/geneval_mini.py). Every eval reports GenEval's per-task table, a held-out CNN judge, the distance
to rendered data and the diversity.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from bench.worlds.detectors import Detector
from bench.core.errors import UserError
from bench.core.policy import PolicyCall
from bench.rewards.geneval_mini import GenEvalMini, check_requirements, strict_and_partial
from bench.core.schema import Option
from bench.worlds import WORLDS
from bench.worlds.sd3 import SD3World
from bench.worlds.shapes_judge import ShapesJudge, judge_detections, load_judge
from bench.worlds.shapes_model import BASE_WEIGHTS, PRETRAIN, load_base_transformer
from bench.worlds.shapes_prompts import TASKS, build_prompts, parse_prompt, scene_for
from bench.worlds.shapes_scene import render_batch

BANK_SIZE = 4096  # rendered scenes the distance-to-data statistic searches


@functools.lru_cache(maxsize=1)
def render_bank(n: int = BANK_SIZE, seed: int = 7) -> torch.Tensor:
    """n faithful renders of random prompts (task uniform), flattened to [n, 3 * 24 * 24] in [0, 1]."""
    rng = np.random.default_rng(seed)
    by_task = {t: [m for m in build_prompts() if m["tag"] == t] for t in TASKS}
    scenes = []
    for _ in range(n):
        metas = by_task[TASKS[int(rng.integers(len(TASKS)))]]
        scenes.append(scene_for(metas[int(rng.integers(len(metas)))], rng, True))
    return render_batch(scenes).flatten(1)


def nearest_render(images: torch.Tensor) -> torch.Tensor:
    """Per image: RMS pixel distance to the nearest bank render."""
    x = images.float().cpu().flatten(1)
    return torch.cdist(x, render_bank()).min(1).values / x.shape[1] ** 0.5


def diversity(images: torch.Tensor, prompts: Sequence[str]) -> float:
    """Mean over prompts of the mean pairwise RMS distance between that prompt's samples."""
    x = images.float().cpu().flatten(1)
    vals = []
    for p in dict.fromkeys(prompts):
        idx = [i for i, q in enumerate(prompts) if q == p]
        if len(idx) > 1:
            vals.append(torch.pdist(x[idx]).mean().item() / x.shape[1] ** 0.5)
    return float(np.mean(vals)) if vals else float("nan")


def task_means(values: torch.Tensor, tags: Sequence[str]) -> dict[str, float]:
    """Mean per GenEval task present, and `overall` = their unweighted mean (GenEval's overall score)."""
    out = {t: values[[i for i, g in enumerate(tags) if g == t]].mean().item() for t in TASKS if t in tags}
    out["overall"] = float(np.mean(list(out.values())))
    return out


@functools.lru_cache(maxsize=4)
def reference_values(prompts: tuple[str, ...] = (), per: int = 4, seed: int = 11) -> dict[str, float]:
    """Rendered data measured as samples are: diversity and nearest-render distance of fresh faithful renders."""
    metas = [parse_prompt(p) for p in prompts] if prompts else build_prompts()
    names = [p for p in prompts] if prompts else [m["prompt"] for m in metas]
    rng = np.random.default_rng(seed)
    scenes, labels = [], []
    for name, m in zip(names, metas):
        for _ in range(per):
            scenes.append(scene_for(m, rng, True))
            labels.append(name)
    x = render_batch(scenes)
    return {"eval_diversity": diversity(x, labels), "eval_nearest_render": nearest_render(x).mean().item()}


def save_prompt_grid(images: torch.Tensor, prompts: Sequence[str], path: Path, scale: int = 4) -> None:
    """Samples [N, 3, H, W] -> PNG with one row per prompt (its samples side by side), the prompt written left."""
    rows = list(dict.fromkeys(prompts))
    per = max(sum(q == p for q in prompts) for p in rows)
    h, w = images.shape[-2:]
    cell, label_w = h * scale + 4, 190
    canvas = Image.new("RGB", (label_w + per * (w * scale + 4), len(rows) * cell), (128, 128, 128))
    draw = ImageDraw.Draw(canvas)
    arr = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for r, p in enumerate(rows):
        draw.text((4, r * cell + cell // 2 - 6), p, fill=(255, 255, 255))
        for c, i in enumerate([i for i, q in enumerate(prompts) if q == p]):
            tile = Image.fromarray(arr[i], "RGB").resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (w * scale + 4) + 2, r * cell + 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


@WORLDS.register("shapes")
class ShapesWorld(SD3World):
    """GenEval-mini: compositional prompts of coloured shapes, the sd3 code path, a pretrained misaligned base."""

    name = "shapes"
    OPTIONS = {
        "device": Option("cpu", str, nullable=True, help="cpu | cuda | cuda:N"),
        "threads": Option(1, int, low=1, nullable=True, help="the 2.3M-parameter transformer is overhead-bound"),
        "reward": Option("geneval_mini", object, valid="a reward name or {name: weight}"),
        "variant": Option("tiny", str, choices=("tiny",), help="fixed: the shipped base's architecture"),
        "tiny": Option(PRETRAIN["tiny"], dict, help="fixed (set by the world): the shipped base's architecture"),
        "tiny_seed": Option(PRETRAIN["tiny_seed"], int, choices=(PRETRAIN["tiny_seed"],),
                            help="fixed: the text encoders the base was pretrained with"),
        "t5": Option(False, bool, choices=(False,), help="fixed: the shapes text stack has no T5"),
        "shift": Option(1.0, float, low=0, low_open=True, help="timestep shift of samplers and eval (pixel space)"),
        "decode_batch": Option(256, int, low=1),
        "weights": Option(None, str, nullable=True, help="base safetensors; null: the shipped file"),
        "lora": Option({}, dict, fields={
            "r": Option(8, int, low=1), "alpha": Option(16.0, float, low=0, low_open=True),
            "targets": Option(["to_q", "to_k", "to_v", "to_out.0"], list, item=Option("", str)),
            "dtype": Option("float32", str), "seed": Option(0, int, nullable=True)}),
        "prompts": Option({}, dict, fields={
            "train": Option("shapes_train.jsonl", str), "eval": Option("shapes_eval.jsonl", str, nullable=True),
            "eval_fraction": Option(0.1, float, low=0, high=1), "split_seed": Option(0, int),
            "eval_max": Option(1000, int, low=1)}),
        "eval": Option({}, dict, fields={
            "prompts_per_task": Option(4, int, low=1, help="held-out prompts per GenEval task"),
            "samples_per_prompt": Option(4, int, low=2, help=">= 2: diversity is measured within a prompt"),
            "steps": Option(20, int, low=1, help="ODE (Euler) steps"),
            "guidance": Option(3.0, float, low=1.0, help="CFG at eval (the base: 0.35 at CFG 3, 0.39 at CFG 1; docs/shapes.md)"),
            "noise_seed": Option(1234, int),
            "batch_size": Option(96, int, low=1),
            "grid_prompts": Option(12, int, low=1, help="prompts (rows) in eval_<tag>.png"),
            "reward": Option(None, object, nullable=True)}),
    }
    EVAL_METRICS = {
        "eval_reward": "mean training reward on the eval prompts",
        "eval_geneval": "GenEval-mini score: strict (all requirements met), averaged over the six tasks",
        **{f"eval_geneval_{t}": f"GenEval-mini strict score on {t} prompts" for t in TASKS},
        "eval_geneval_partial": "partial-credit score (fraction of requirements met), task-averaged",
        "eval_judge": "the held-out CNN judge's GenEval score (never a reward), task-averaged",
        "eval_nearest_render": "mean RMS pixel distance of a sample to the nearest of 4096 rendered scenes",
        "eval_diversity": "mean pairwise RMS distance between samples of one prompt",
    }

    @classmethod
    def detectors(cls) -> list[Detector]:
        """Diversity collapse, samples leaving rendered data, the scorer accepting what the judge rejects."""
        ref = reference_values()
        return [Detector("eval_diversity", "floor", "diversity collapsed", ref["eval_diversity"], factor=0.5),
                Detector("eval_nearest_render", "ceiling", "samples left the rendered data",
                         ref["eval_nearest_render"], factor=2.0, rise=0.05),
                Detector("eval_geneval", "gap", "the GenEval-mini scorer accepts what the held-out judge rejects",
                         rise=0.15, partner="eval_judge")]

    @classmethod
    def reference_values(cls) -> dict[str, float]:
        """Rendered data's own diversity and nearest-render distance, measured as evaluate() measures samples."""
        return reference_values()

    def __init__(self, cfg, cache_dir):
        super().__init__({**dict(cfg), "tiny": PRETRAIN["tiny"]}, cache_dir)
        self._scorer: GenEvalMini | None = None
        self._judge: ShapesJudge | None = None
        for p in self.prompt_sets[0].prompts + self.prompt_sets[1].prompts:
            meta = parse_prompt(p)  # unknown words / templates: one-line UserError before anything runs
            given = self.prompt_metadata(p)
            if given and given.get("include") != meta["include"]:
                raise UserError(f"world.prompts: the metadata of {p!r} disagrees with the prompt's words")

    def load_base_transformer(self) -> Any:
        """The pretrained base (config hash checked against scripts/pretrain_shapes.py's config)."""
        return load_base_transformer(Path(self.cfg.get("weights") or BASE_WEIGHTS), PRETRAIN)

    def prompt_metadata(self, prompt: str) -> dict[str, Any]:
        """GenEval metadata from the prompt file, else from the prompt's words."""
        return super().prompt_metadata(prompt) or parse_prompt(prompt)

    def eval_prompts(self) -> list[str]:
        """world.eval.prompts_per_task held-out prompts of each task, spread evenly over the task's list."""
        k = int(self.cfg["eval"]["prompts_per_task"])
        out = []
        for t in TASKS:
            pool = [p for p in self.prompt_sets[1].prompts if self.prompt_metadata(p)["tag"] == t]
            idx = np.linspace(0, len(pool) - 1, min(k, len(pool))).round().astype(int) if pool else []
            out += [pool[i] for i in dict.fromkeys(idx.tolist())] if len(pool) else []
        return out

    @property
    def scorer(self) -> GenEvalMini:
        """The exact scorer at its configured options (strict and partial both come out of it)."""
        if self._scorer is None:
            self._scorer = GenEvalMini(self, dict(self.cfg.get("reward_options") or {}).get("geneval_mini"))
        return self._scorer

    @property
    def judge(self) -> ShapesJudge:
        """The held-out CNN judge (shipped weights, hash-checked)."""
        if self._judge is None:
            self._judge = load_judge()
        return self._judge

    def judge_scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The held-out judge's strict GenEval score per image."""
        dets = judge_detections(self.judge, images)
        return torch.tensor([strict_and_partial(check_requirements(self.prompt_metadata(p), d))[0]
                             for p, d in zip(prompts, dets)])

    @torch.no_grad()
    def evaluate(self, model: PolicyCall, out_dir: Path | None, tag: str) -> dict[str, float]:
        """GenEval-mini per task on fixed noise, the training reward, the held-out judge, distance and diversity."""
        batches = list(self.eval_samples(model, self.eval_prompts()))
        images = torch.cat([b[0] for b in batches]).cpu()
        prompts = [p for b in batches for p in b[1]]
        model.meter.count_reward(len(prompts))
        total, parts = self.eval_reward_fn(images, prompts)
        tags = [self.prompt_metadata(p)["tag"] for p in prompts]
        strict, partial = self.scorer.scores(images, prompts)
        per_task = task_means(strict, tags)
        metrics = {"eval_reward": total.float().mean().item(), "eval_geneval": per_task.pop("overall")}
        metrics.update({f"eval_geneval_{t}": v for t, v in per_task.items()})
        metrics["eval_geneval_partial"] = task_means(partial, tags)["overall"]
        metrics["eval_judge"] = task_means(self.judge_scores(images, prompts), tags)["overall"]
        metrics["eval_nearest_render"] = nearest_render(images).mean().item()
        metrics["eval_diversity"] = diversity(images, prompts)
        if len(parts) > 1:
            metrics.update({f"eval_reward_{k}": v.float().mean().item() for k, v in parts.items()})
        if out_dir is not None:
            rows = list(dict.fromkeys(prompts))
            keep = set(rows[::max(1, len(rows) // int(self.cfg["eval"]["grid_prompts"]))]
                       [:int(self.cfg["eval"]["grid_prompts"])])
            idx = [i for i, p in enumerate(prompts) if p in keep]
            save_prompt_grid(images[idx], [prompts[i] for i in idx], Path(out_dir) / f"eval_{tag}.png")
        return metrics
