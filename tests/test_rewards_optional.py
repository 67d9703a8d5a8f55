"""Optional-extra rewards (HPSv2.1, ImageReward): the install hint when the package is absent, and the scoring glue
against stand-in modules with the packages' interfaces (the real packages pull a CUDA torchvision; not installed)."""
from __future__ import annotations

import importlib.util
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.core.errors import UserError
from bench.rewards._clip_common import OPENAI_MEAN, OPENAI_STD, ImagePrep

WORLD = SimpleNamespace(device=torch.device("cpu"))
PROMPTS = ["a cat", "a dog on a couch", "a red car"]
HINT = r"pip install 'diffrl-bench\[gpu-rewards\]'"


def _images(n=3, size=40, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.skipif(importlib.util.find_spec("hpsv2") is not None, reason="hpsv2 is installed")
def test_hpsv2_missing_extra_gives_install_hint(tmp_path):
    from bench.rewards.hpsv2 import HPSv2

    with pytest.raises(UserError, match=rf"reward 'hpsv2' needs the optional package 'hpsv2'.*{HINT}"):
        HPSv2(WORLD, {"checkpoint_path": str(tmp_path)})


@pytest.mark.skipif(importlib.util.find_spec("ImageReward") is not None, reason="image-reward is installed")
def test_imagereward_missing_extra_gives_install_hint(tmp_path):
    from bench.rewards.imagereward import ImageRewardScore

    with pytest.raises(UserError, match=rf"reward 'imagereward' needs the optional package 'image-reward'.*{HINT}"):
        ImageRewardScore(WORLD, {})


class _FakeOpenCLIP(nn.Module):
    """The part of hpsv2's OpenCLIP the reward uses: model(image, text) -> dict of normalised features."""

    def __init__(self):
        super().__init__()
        self.visual = nn.Linear(3, 8)
        self.visual.image_size = (32, 32)
        self.text = nn.Embedding(64, 8)

    def forward(self, image, text):
        img = F.normalize(self.visual(image.mean((2, 3))), dim=-1)
        txt = F.normalize(self.text(text).mean(1), dim=-1)
        return {"image_features": img, "text_features": txt, "logit_scale": torch.tensor(100.0)}


def _tokenize(prompts):
    return torch.tensor([[ord(c) % 64 for c in (p + " " * 12)[:12]] for p in prompts])


def test_hpsv2_glue_with_stand_in_module(tmp_path, monkeypatch):
    calls = {}

    def create_model_and_transforms(arch, pretrained, **kw):
        calls.update(arch=arch, pretrained=pretrained)
        return _FakeOpenCLIP(), None, None

    oc = types.ModuleType("hpsv2.src.open_clip")
    oc.create_model_and_transforms, oc.get_tokenizer = create_model_and_transforms, lambda arch: _tokenize
    for name in ("hpsv2", "hpsv2.src"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "hpsv2.src.open_clip", oc)
    torch.manual_seed(0)
    trained = _FakeOpenCLIP()
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")

    from bench.rewards.hpsv2 import HPSv2

    r = HPSv2(WORLD, {"checkpoint_path": str(tmp_path / "HPS_v2.1_compressed.pt"), "batch_size": 2})
    assert calls == {"arch": "ViT-H-14", "pretrained": None}  # architecture only: nothing to download
    images = _images()
    with torch.no_grad():
        out = trained(ImagePrep(32, 32, OPENAI_MEAN, OPENAI_STD)(images), _tokenize(PROMPTS))
    torch.testing.assert_close(r(images, PROMPTS), (out["image_features"] * out["text_features"]).sum(-1))
    with pytest.raises(UserError, match="reward 'hpsv2': world.reward_options.hpsv2.checkpoint_path="):
        HPSv2(WORLD, {"checkpoint_path": str(tmp_path / "missing.pt")})


class _Tok:
    def __call__(self, prompts, padding, truncation, max_length, return_tensors):
        assert (padding, max_length) == ("max_length", 35)  # ImageReward's own tokenisation
        ids = _tokenize_ir(prompts)
        enc = SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))
        enc.to = lambda device: enc
        return enc


class _FakeBLIP(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokenizer = _Tok()
        self.vis = nn.Linear(3, 6)
        self.emb = nn.Embedding(50, 6)

    def visual_encoder(self, px):
        return self.vis(px.flatten(2).transpose(1, 2))  # [B, HW, 6] patch embeddings

    def text_encoder(self, ids, attention_mask, encoder_hidden_states, encoder_attention_mask, return_dict):
        h = self.emb(ids) + encoder_hidden_states.mean(1, keepdim=True)
        return SimpleNamespace(last_hidden_state=h)


class _FakeImageReward(nn.Module):
    def __init__(self):
        super().__init__()
        self.blip = _FakeBLIP()
        self.mlp = nn.Linear(6, 1)
        self.mean, self.std = 0.17, 1.03


def test_imagereward_glue_with_stand_in_module(tmp_path, monkeypatch):
    (tmp_path / "ImageReward.pt").write_bytes(b"x")
    (tmp_path / "med_config.json").write_text("{}")
    torch.manual_seed(0)
    model = _FakeImageReward()
    seen = {}

    def load(name, device, med_config):
        seen.update(name=name, med_config=med_config)
        return model

    mod = types.ModuleType("ImageReward")
    mod.load = load
    monkeypatch.setitem(sys.modules, "ImageReward", mod)
    from bench.rewards.imagereward import ImageRewardScore

    r = ImageRewardScore(WORLD, {"checkpoint_path": str(tmp_path / "ImageReward.pt"),
                                 "med_config_path": str(tmp_path / "med_config.json"), "batch_size": 2})
    assert seen == {"name": str(tmp_path / "ImageReward.pt"), "med_config": str(tmp_path / "med_config.json")}
    images = _images(seed=1)
    with torch.no_grad():
        px = ImagePrep(224, 224, OPENAI_MEAN, OPENAI_STD)(images)
        ids = _tokenize_ir(PROMPTS)
        h = model.blip.emb(ids)[:, 0] + model.blip.visual_encoder(px).mean(1)
        expect = ((model.mlp(h) - model.mean) / model.std).squeeze(-1)
    torch.testing.assert_close(r(images, PROMPTS), expect)
    with pytest.raises(UserError, match="med_config_path"):
        ImageRewardScore(WORLD, {"checkpoint_path": str(tmp_path / "ImageReward.pt")})


def _tokenize_ir(prompts):
    return torch.tensor([[ord(c) % 50 for c in (p + " " * 35)[:35]] for p in prompts])
