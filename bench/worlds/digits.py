"""The embedded CPU world: scikit-learn's 8x8 digits, a flow MLP policy and classifier judges."""
from __future__ import annotations

import functools
import hashlib
import json
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.runner import store
from bench.worlds.detectors import Detector
from bench.core.errors import UserError
from bench.core.families import FLOW, ModelFamily
from bench.core.policy import PolicyCall
from bench.core.schema import Option
from bench.core.threads import reapply as reapply_thread_cap
from bench.worlds import WORLDS
from bench.worlds.base import World
from bench.worlds.digits_judges import fit_heldout_judge, fit_judge
from bench.worlds.digits_model import DigitsFlowMLP, pretrain
from samplers.ode import ODESampler

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten {d}", "the digit {d}", "a drawing of the number {w}", "the number {w}, written by hand"]
_DIGIT_RE = re.compile(r"\b(\d|" + "|".join(WORDS) + r")\b", re.IGNORECASE)


@functools.lru_cache(maxsize=1)
def load_real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 bundled digits scaled to [-1, 1] (64 dims) and their labels; read once per process (every cell's
    world shares the tensors, which nothing writes to)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 8.0 - 1.0, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


@functools.lru_cache(maxsize=1)
def real_reference_values() -> dict[str, float]:
    """Real digits scored like samples: within-digit diversity over all of a digit's real images, and each real
    digit's distance to its nearest other real digit (leave-one-out), both RMS per pixel."""
    x, y = load_real_digits()
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return {"eval_diversity": float(np.mean([torch.pdist(x[y == k]).mean().item() / 8.0 for k in range(10)])),
            "eval_nearest_real": d.min(1).values.mean().item() / 8.0}


def _checked_state(model: torch.nn.Module, state: dict) -> dict:
    """`state` if it fits `model` (a cache file of another architecture or a damaged one raises here)."""
    model.load_state_dict(state)
    return state


@WORLDS.register("digits")
class DigitsWorld(World):
    """Class-conditional generation of 8x8 digits; rewards and held-out detectors come from real-digit classifiers."""

    OPTIONS = {
        "device": Option("cpu", str, nullable=True, help="cpu | cuda | cuda:N"),
        "threads": Option(1, int, low=1, nullable=True, help="the 64-dim MLP is overhead-bound: 1 thread"),
        "shift": Option(1.0, float, low=0, low_open=True),
        "pretrain": Option({}, dict, fields={
            "steps": Option(50, int, low=0, help="rectified-flow pretraining steps"),
            "seed": Option(0, int),
            "lr": Option(1e-3, float, low=0, low_open=True),
            "batch": Option(256, int, low=1),
            "label_noise": Option(0.0, float, low=0, high=1, help="fraction of labels randomised"),
            "label_dropout": Option(0.1, float, low=0, high=1, help="CFG's unconditional training fraction"),
            "hidden": Option(256, int, low=1),
            "depth": Option(3, int, low=1),
        }),
        "eval": Option({}, dict, fields={
            "samples_per_class": Option(20, int, low=2, help="eval samples per digit on fixed noise"),
            "steps": Option(10, int, low=1, help="eval ODE steps, no CFG"),
            "noise_seed": Option(1234, int),
        }),
    }
    name = "digits"
    latent_shape = (64,)
    EVAL_METRICS = {
        "eval_reward": "mean training reward on the eval noise",
        "eval_accuracy": "fraction the reward judge classifies as the prompted digit",
        "eval_heldout_accuracy": "the same by the held-out RBF-SVM judge (trained on the other half of the data)",
        "eval_diversity": "mean pairwise RMS distance between samples of one digit",
        "eval_nearest_real": "mean RMS distance of a sample to its nearest real digit",
    }

    @classmethod
    def reference_values(cls) -> dict[str, float]:
        """The real digits' own diversity and nearest-real distance (leave-one-out), as evaluate() measures them."""
        return real_reference_values()

    @classmethod
    def sample_layout(cls) -> tuple[list[str], int]:
        """save_digit_grid's sheets: one row per digit (prompted as TEMPLATES[0]), 10 samples each."""
        return [TEMPLATES[0].format(d=d) for d in range(10)], 10

    @classmethod
    def detectors(cls) -> list[Detector]:
        """Diversity far below real digits', samples drifting from them, and the two judges parting."""
        ref = cls.reference_values()
        return [Detector("eval_diversity", "floor", "diversity collapsed", ref["eval_diversity"], factor=0.5),
                Detector("eval_nearest_real", "ceiling", "samples left the real digits", ref["eval_nearest_real"],
                         factor=2.0, rise=0.15),
                Detector("eval_accuracy", "gap", "the reward judge accepts what the held-out judge rejects",
                         rise=0.15, partner="eval_heldout_accuracy")]

    def __init__(self, cfg, cache_dir):
        super().__init__(cfg, cache_dir)
        self.real_x, self.real_y = load_real_digits()
        perm = torch.randperm(len(self.real_y), generator=torch.Generator().manual_seed(0))
        half = len(perm) // 2
        self.split_judge, self.split_heldout = perm[:half], perm[half:]
        self._judges = None

    # -- prompts ---------------------------------------------------------------------------
    @staticmethod
    @functools.lru_cache(maxsize=4096)  # the reward parses every leaf's prompt every iteration: a few dozen texts
    def parse_prompt(prompt: str) -> int:
        m = _DIGIT_RE.search(prompt)
        if not m:
            raise UserError(f"unknown prompt '{prompt}'; digits prompts name one digit 0-9 "
                            f"(e.g. '{TEMPLATES[0].format(d=7)}' or '{TEMPLATES[2].format(w='seven')}')")
        tok = m.group(1).lower()
        return int(tok) if tok.isdigit() else WORDS.index(tok)

    def train_prompts(self):
        return [t.format(d=d, w=WORDS[d]) for d in range(10) for t in TEMPLATES]

    def encode(self, prompts):
        return torch.tensor([self.parse_prompt(p) for p in prompts], dtype=torch.long, device=self.device)

    # -- model -----------------------------------------------------------------------------
    def _cache_path(self, kind: str, spec: dict) -> Path:
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        return self.cache_dir / f"digits_{kind}_{key}.pt"

    def model_family(self) -> ModelFamily:
        """What the policy predicts: a flow velocity here (digits_vp: a VP model's eps)."""
        return FLOW

    def build_policy(self):
        family = self.model_family()
        spec = {"version": 1, **dict(self.cfg.get("pretrain", {}))}
        if family is not FLOW:  # the flow model keeps its cache key
            spec["family"] = family.spec()
        path = self._cache_path("base", spec)
        model = DigitsFlowMLP(int(spec.get("hidden", 256)), int(spec.get("depth", 3)), family=family)
        state = store.cached(path, lambda p: _checked_state(model, torch.load(p, map_location="cpu", weights_only=True)),
                             lambda: pretrain(self.real_x, self.real_y, spec, family).state_dict(), torch.save)
        model.load_state_dict(state)
        return model.to(self.device).eval()

    # -- judges and rewards ----------------------------------------------------------------
    @property
    def judges(self):
        if self._judges is None:
            path = self._cache_path("judges", {"version": 1})
            x, y = self.real_x.numpy(), self.real_y.numpy()
            a, b = self.split_judge.numpy(), self.split_heldout.numpy()
            self._judges = store.cached(path, lambda p: pickle.loads(p.read_bytes()),
                                        lambda: (fit_judge(x[a], y[a]), fit_heldout_judge(x[b], y[b])),
                                        lambda o, p: p.write_bytes(pickle.dumps(o)))
            reapply_thread_cap()  # scikit-learn's OpenMP runtime may have loaded only now
        return self._judges

    def decode(self, x0):
        return ((x0.float().clamp(-1, 1) + 1) / 2).view(-1, 1, 8, 8)

    @staticmethod
    def _features(images: torch.Tensor) -> np.ndarray:
        return (images.flatten(1).cpu().double().numpy() * 2 - 1)

    def judge_proba(self, images: torch.Tensor) -> torch.Tensor:
        from sklearn import config_context  # scikit-learn loads with the judges, not with the world

        # assume_finite skips scikit-learn's own scan of the batch (0.6 of a 4 ms call); torch's check is 100x
        # cheaper, and non-finite input still gets scikit-learn's error.
        with config_context(assume_finite=bool(torch.isfinite(images).all())):
            proba = self.judges[0].predict_proba(self._features(images))
        return torch.tensor(proba, dtype=torch.float32)

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, model: PolicyCall, out_dir: Path | None, tag: str) -> dict[str, float]:
        ecfg = dict(self.cfg.get("eval", {}))
        per_class = int(ecfg.get("samples_per_class", 20))
        prompts = [TEMPLATES[0].format(d=d) for d in range(10) for _ in range(per_class)]
        labels = torch.arange(10).repeat_interleave(per_class)
        sampler = ODESampler({"steps": int(ecfg.get("steps", 10)), "shift": float(self.cfg.get("shift", 1.0))})
        gen = torch.Generator().manual_seed(int(ecfg.get("noise_seed", 1234)))
        # The protocol is CFG-free whatever the training guidance (DDPO trains with CFG 5): same scale for every cell.
        call = PolicyCall(model.policy, model.meter, guidance=1.0, params=model.params, detach_uncond=model.detach_uncond)
        with torch.no_grad():
            rollout = sampler.sample(call, prompts, self.encode(prompts), 1, self.latent_shape, gen)
            x0 = rollout.x0.float()
            images = self.decode(x0)
            reward, _ = self.reward_fn(images, prompts)
        feats = self._features(images)
        judge, heldout = self.judges
        pixels = torch.tensor(feats, dtype=torch.float32)
        nearest = torch.cdist(pixels, self.real_x).min(1).values / 8.0  # RMS per pixel
        diversity = np.mean([torch.pdist(pixels[labels == d]).mean().item() / 8.0 for d in range(10)])
        metrics = {
            "eval_reward": reward.mean().item(),
            "eval_accuracy": float((judge.predict(feats) == labels.numpy()).mean()),
            "eval_heldout_accuracy": float((heldout.predict(feats) == labels.numpy()).mean()),
            "eval_diversity": float(diversity),
            "eval_nearest_real": nearest.mean().item(),
        }
        if out_dir is not None:
            save_digit_grid(images.view(10, per_class, 8, 8)[:, :10], Path(out_dir) / f"eval_{tag}.png")
        return metrics


def save_digit_grid(images: torch.Tensor, path: Path, scale: int = 4) -> None:
    """[rows, cols, 8, 8] in [0, 1] -> one PNG, one row per digit, a 1-pixel grey gutter."""
    rows, cols, h, w = images.shape
    canvas = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1), 0.5, dtype=np.float32)
    for r in range(rows):
        for c in range(cols):
            canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = images[r, c].cpu().numpy()
    img = Image.fromarray((canvas * 255).astype(np.uint8), "L").resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
