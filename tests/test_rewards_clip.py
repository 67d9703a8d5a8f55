"""CLIP-based reward loaders (PickScore, CLIPScore, LAION aesthetic) on tiny random CLIPModels saved to disk,
checked against transformers' own CLIPModel forward and image processor; missing weights give clear errors."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from bench.core.errors import UserError
from bench.rewards import REWARDS
from bench.rewards._clip_common import ImagePrep, tiny_clip
from bench.rewards.aesthetic import Aesthetic, load_head
from bench.rewards.clipscore import CLIPScore
from bench.rewards.combine import WeightedReward
from bench.rewards.pickscore import PickScore

WORLD = SimpleNamespace(device=torch.device("cpu"), name="stub")
PROMPTS = ["a photo of a cat", "a red car", "a dog on the beach", "a painting of a horse"]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIPModel + tokenizer + preprocessor_config.json, as a real checkpoint folder is laid out."""
    path = tmp_path_factory.mktemp("clip")
    model, tok, _ = tiny_clip(seed=3)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": MEAN, "image_std": STD,
        "resample": 3, "do_convert_rgb": True}))
    return path


def _images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    # Multiples of 1/255, so the uint8 round trip of the PIL reference is exact.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255


def _reference_logits(clip_dir, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """transformers end to end: its image processor on PIL images, its tokenizer, CLIPModel.forward."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    proc = CLIPImageProcessorPil.from_pretrained(str(clip_dir))
    tok = AutoTokenizer.from_pretrained(str(clip_dir))
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    px = proc(images=pil, return_tensors="pt").pixel_values
    t = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=t.input_ids, attention_mask=t.attention_mask, pixel_values=px)
    return out.logits_per_image.diagonal(), model.logit_scale.exp()


def test_registered():
    for name in ("pickscore", "clipscore", "aesthetic", "hpsv2", "imagereward", "geneval", "jpeg"):
        assert name in REWARDS


def test_pickscore_matches_clipmodel_logits(clip_dir):
    images = _images()
    r = PickScore(WORLD, {"model_path": str(clip_dir)})
    ref, _ = _reference_logits(clip_dir, images, PROMPTS)
    torch.testing.assert_close(r(images, PROMPTS), ref, rtol=1e-5, atol=1e-5)
    scaled = PickScore(WORLD, {"model_path": str(clip_dir), "scale": 26.0, "batch_size": 3})  # Flow-GRPO's /26
    torch.testing.assert_close(scaled(images, PROMPTS), ref / 26.0, rtol=1e-5, atol=1e-6)


def test_clipscore_is_clamped_cosine(clip_dir):
    images = _images(seed=1)
    r = CLIPScore(WORLD, {"model_path": str(clip_dir)})
    logits, scale = _reference_logits(clip_dir, images, PROMPTS)
    torch.testing.assert_close(r(images, PROMPTS), 2.5 * (logits / scale).clamp_min(0), rtol=1e-5, atol=1e-6)


def test_on_device_preprocessing_close_to_transformers_pil(clip_dir):
    """Resize + crop on tensors vs transformers' PIL bicubic path, for a 64 x 48 image (no round trip to disk)."""
    from transformers import CLIPImageProcessorPil

    # A smooth image (natural images are mostly low-frequency; resampling white noise is kernel-specific).
    coarse = _images(2, 4, seed=2)
    images = (torch.nn.functional.interpolate(coarse, size=(48, 64), mode="bilinear", align_corners=True) * 255).round() / 255
    proc = CLIPImageProcessorPil.from_pretrained(str(clip_dir))
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    ref = proc(images=pil, return_tensors="pt").pixel_values
    ours = ImagePrep.from_processor_config(json.loads((clip_dir / "preprocessor_config.json").read_text()))(images)
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    # Same geometry and resampling family (bicubic, antialiased); PIL rounds to uint8 after resizing (1/255 =
    # 0.02 here after normalisation), so the two agree to about that.
    assert (ours - ref).abs().mean() < 0.01 and (ours - ref).abs().max() < 0.05


def _write_head(path, sd):
    torch.save(sd, path)
    return path


def test_aesthetic_heads(clip_dir, tmp_path):
    images = _images(seed=4)
    g = torch.Generator().manual_seed(0)
    dims = [16, 12, 8, 6, 4, 1]  # the improved predictor's layer pattern at tiny width (768-1024-128-64-16-1)
    mlp = {}
    for idx, (i, o) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        mlp[f"layers.{idx}.weight"] = torch.randn(o, i, generator=g)
        mlp[f"layers.{idx}.bias"] = torch.randn(o, generator=g)
    lin = {"weight": torch.randn(1, 16, generator=g), "bias": torch.randn(1, generator=g)}
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    with torch.no_grad():
        px = ImagePrep(32, 32, MEAN, STD)(images)
        emb = model.get_image_features(pixel_values=px)
        emb = torch.nn.functional.normalize(emb if isinstance(emb, torch.Tensor) else emb.pooler_output, dim=-1)
    mlp_layers = [(mlp[f"layers.{i}.weight"], mlp[f"layers.{i}.bias"]) for i in (0, 2, 4, 6, 7)]
    for sd, layers, name in ((mlp, mlp_layers, "mlp.pth"), (lin, [(lin["weight"], lin["bias"])], "linear.pth")):
        r = Aesthetic(WORLD, {"model_path": str(clip_dir), "head_path": str(_write_head(tmp_path / name, sd))})
        expect = emb
        for w, b in layers:  # no activations between the Linears (dropout is off at inference)
            expect = expect @ w.T + b
        torch.testing.assert_close(r(images, PROMPTS), expect.squeeze(-1), rtol=1e-4, atol=1e-5)
    assert len(load_head(tmp_path / "mlp.pth")) == 5
    bad = _write_head(tmp_path / "bad.pth", {"weight": torch.randn(1, 7), "bias": torch.zeros(1)})
    with pytest.raises(UserError, match="7-d embeddings but the CLIP model gives 16-d"):
        Aesthetic(WORLD, {"model_path": str(clip_dir), "head_path": str(bad)})
    junk = _write_head(tmp_path / "junk.pth", {"foo": torch.zeros(2)})
    with pytest.raises(UserError, match="not a LAION aesthetic head"):
        Aesthetic(WORLD, {"model_path": str(clip_dir), "head_path": str(junk)})


@pytest.mark.parametrize("cls,name", [(PickScore, "pickscore"), (CLIPScore, "clipscore"), (Aesthetic, "aesthetic")])
def test_missing_weights_are_clear_errors(cls, name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=rf"reward '{name}' needs local weights: set world.reward_options.{name}.model_path="):
        cls(WORLD, {})
    missing = tmp_path / "no-such-model"
    with pytest.raises(UserError, match=rf"world.reward_options.{name}.model_path='{missing}' does not exist "
                                        r"\(HF_HUB_OFFLINE=1: nothing is downloaded\)"):
        cls(WORLD, {"model_path": str(missing)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=rf"reward '{name}': cannot load a transformers CLIPModel"):
        cls(WORLD, {"model_path": str(tmp_path / "empty"), "head_path": __file__})


def test_weighted_sum_with_tiny_models():
    images = _images(seed=5)
    combo = WeightedReward({"pickscore": 0.5, "jpeg": 1.0}, WORLD, {"pickscore": {"tiny": True}})
    total, parts = combo(images, PROMPTS)
    torch.testing.assert_close(total, 0.5 * parts["pickscore"] + parts["jpeg"])
    assert parts["jpeg"].lt(0).all() and parts["pickscore"].shape == (4,)
