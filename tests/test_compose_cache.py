"""Hydra compositions cached across processes (bench/runner/compose_cache.py) and cell configs built from earlier
ones of their shape (bench/runner/config_clone.py): both must give exactly what they replace."""
from __future__ import annotations

import pickle
import shutil

import pytest
from omegaconf import OmegaConf

from bench.runner import compose_cache
from bench.runner.config import compose_config
from bench.runner.config_clone import ConfigFactory

OVERRIDES = ["grid=smoke", "estimator=elbo", "train.lr=0.0003"]


def test_a_cached_composition_is_the_composition(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DIFFRL_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(compose_cache, "compose_config", lambda o: calls.append(o) or compose_config(o))
    first = compose_cache.compose_cached(OVERRIDES)
    again = compose_cache.compose_cached(OVERRIDES)
    assert len(calls) == 1  # the second came from the cache
    fresh = compose_config(OVERRIDES)
    for cfg in (first, again):
        assert OmegaConf.to_yaml(cfg) == OmegaConf.to_yaml(fresh)
        assert OmegaConf.is_struct(cfg) == OmegaConf.is_struct(fresh)


def test_an_edited_config_file_is_a_new_digest(tmp_path, monkeypatch) -> None:
    configs = tmp_path / "experiments"
    shutil.copytree(compose_cache.CONFIG_DIR, configs)
    monkeypatch.setattr(compose_cache, "CONFIG_DIR", configs)
    compose_cache.forget()
    before = compose_cache.configs_digest()
    path = configs / "config.yaml"
    path.write_text(path.read_text() + "\n# edited\n")
    compose_cache.forget()
    assert compose_cache.configs_digest() != before
    compose_cache.forget()


def test_cache_off_and_failed_compositions_are_not_kept(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DIFFRL_CACHE_DIR", "off")
    assert compose_cache.cache_root() is None
    assert compose_cache.compose_cached(OVERRIDES).train.lr == pytest.approx(3e-4)
    monkeypatch.setenv("DIFFRL_CACHE_DIR", str(tmp_path))
    with pytest.raises(Exception):
        compose_cache.compose_cached(["grid=smoke", "train.lr=[unclosed"])
    assert not list(tmp_path.rglob("*.pkl"))


def test_a_config_built_from_an_earlier_one_equals_create() -> None:
    factory = ConfigFactory()
    first = {"seed": 0, "train": {"lr": 1e-4, "steps": [1, 2]}, "world": {"name": "digits", "noise": None}}
    later = [{"seed": 1, "train": {"lr": 3e-4, "steps": [1, 3]}, "world": {"name": "digits", "noise": 7}},
             {"seed": 2, "train": {"lr": 1, "steps": [1, 2]}, "world": {"name": "digits", "noise": "${seed}"}},
             {"seed": 3, "train": {"lr": 1e-4}, "world": {"name": "digits", "noise": None}}]  # another shape
    for values in [first, *later]:
        made, created = factory.make(values), OmegaConf.create(values)
        assert OmegaConf.to_yaml(made) == OmegaConf.to_yaml(created)
        assert pickle.dumps(OmegaConf.to_container(made)) == pickle.dumps(OmegaConf.to_container(created))
        assert OmegaConf.to_container(made, resolve=True) == OmegaConf.to_container(created, resolve=True)
