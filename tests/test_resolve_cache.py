"""Resolved cell configs kept across processes (bench/runner/resolve_cache.py) and the intact-metrics marker of
finished cells (bench/runner/store.py): what a rerun of a finished grid skips must be exactly what it would have
computed, and every edit that could change it must make it compute again."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.runner import compose_cache, resolve_cache, store
from bench.runner.grid import _resolved
from runner_helpers import digits_cache, finished_grid, results_dir  # noqa: F401

TEMPLATE = ("grid=smoke", "estimator=elbo", "train.lr=0.0003")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DIFFRL_CACHE_DIR", str(tmp_path / "compose"))
    resolve_cache.forget()
    yield tmp_path
    resolve_cache.forget()


def counting(calls: list, template=TEMPLATE, seed: int = 0):
    return lambda: calls.append(1) or _resolved(list(template), seed)


def test_a_kept_resolution_equals_resolving_and_is_a_copy(cache) -> None:
    calls: list = []
    first = resolve_cache.resolved_cell(TEMPLATE, 0, counting(calls))
    again = resolve_cache.resolved_cell(TEMPLATE, 0, counting(calls))
    assert len(calls) == 1, "the second came from the cache"
    assert again == first == _resolved(list(TEMPLATE), 0)
    again[0]["train"]["lr"] = 1.0  # a caller editing its copy does not edit what the next caller gets
    assert resolve_cache.resolved_cell(TEMPLATE, 0, counting(calls))[0]["train"]["lr"] == pytest.approx(3e-4)
    resolve_cache.resolved_cell(TEMPLATE, 1, counting(calls, seed=1))
    assert len(calls) == 2, "another seed is another entry"


def test_cache_off_resolves_every_time(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DIFFRL_CACHE_DIR", "off")
    calls: list = []
    for _ in range(2):
        resolve_cache.resolved_cell(TEMPLATE, 0, counting(calls))
    assert len(calls) == 2


def test_an_edited_config_file_code_file_or_read_env_var_is_a_new_digest(cache, monkeypatch) -> None:
    configs = cache / "experiments"
    shutil.copytree(compose_cache.CONFIG_DIR, configs)
    monkeypatch.setattr(compose_cache, "CONFIG_DIR", configs)
    monkeypatch.setattr(resolve_cache, "CONFIG_DIR", configs)
    (cache / "pkg").mkdir()
    code = cache / "pkg" / "schema.py"
    code.write_text("LR = 1e-4\n")
    monkeypatch.setattr(resolve_cache, "ROOT", cache)
    monkeypatch.setattr(resolve_cache, "PACKAGES", ("pkg",))
    compose_cache.forget()
    digests = [resolve_cache.state_digest(fresh=True)]
    assert resolve_cache.state_digest(fresh=True) == digests[0], "nothing edited, same digest"

    (configs / "config.yaml").write_text((configs / "config.yaml").read_text() + "\n# edited\n")
    compose_cache.forget()
    digests.append(resolve_cache.state_digest(fresh=True))
    code.write_text("LR = 3e-4\n")  # same size: the contents, not only the stat, are hashed when a stat changes
    digests.append(resolve_cache.state_digest(fresh=True))
    assert "SD35_MODEL_PATH" in resolve_cache._env_names()  # read by the sd35 grids as ${oc.env:SD35_MODEL_PATH,...}
    monkeypatch.setenv("SD35_MODEL_PATH", "/models/sd35")
    digests.append(resolve_cache.state_digest(fresh=True))
    monkeypatch.setenv("SOME_UNREAD_VARIABLE", "x")
    assert resolve_cache.state_digest(fresh=True) == digests[-1], "a variable no config reads changes nothing"
    assert len(set(digests)) == len(digests) == 4
    compose_cache.forget()


def test_plugin_cells_and_errors_are_never_kept(cache) -> None:
    values, dropped = _resolved(list(TEMPLATE), 0)
    plugin = {**values, "objective": {**values["objective"], "name": "my_lab.objectives:MyObjective"}}
    calls: list = []
    for _ in range(2):
        resolve_cache.resolved_cell(TEMPLATE, 0, lambda: calls.append(1) or (plugin, dropped))
    assert len(calls) == 2, "a plugin's code is not in the digest, so its resolution is not kept"

    def failing():
        calls.append(1)
        raise ValueError("bad value")
    for _ in range(2):
        with pytest.raises(ValueError):
            resolve_cache.resolved_cell(("grid=smoke", "train.lr=oops"), 0, failing)
    assert len(calls) == 4
    assert not list((cache / "resolved").rglob("*.pkl"))


def test_a_checked_intact_metrics_file_is_not_read_again_until_it_changes(tmp_path, digits_cache,  # noqa: F811
                                                                        finished_grid, monkeypatch) -> None:  # noqa: F811
    res = results_dir(tmp_path, digits_cache)
    shutil.copytree(finished_grid / "smoke", res / "smoke", symlinks=True)
    cell = next(p.parent for p in (res / "smoke").glob(f"*/{store.METRICS_FILE}"))
    (cell / store.VERIFIED_FILE).unlink(missing_ok=True)
    reference = (cell / store.METRICS_FILE).read_text()
    assert store.repair_finished_metrics(cell) is False
    assert (cell / store.VERIFIED_FILE).exists()

    real_checkpoints = store.checkpoint_paths
    monkeypatch.setattr(store, "checkpoint_paths", lambda d: pytest.fail("an unchanged checked file was re-read"))
    assert store.repair_finished_metrics(cell) is False
    monkeypatch.setattr(store, "checkpoint_paths", real_checkpoints)

    (cell / store.METRICS_FILE).write_text(reference[: reference.index("\n") + 1])  # cut after the marker
    warnings: list[str] = []
    assert store.repair_finished_metrics(cell, echo=warnings.append) is True
    assert (cell / store.METRICS_FILE).read_text() == reference and len(warnings) == 1


def test_cells_sharing_their_method_sections_share_one_incompatibility_answer() -> None:
    """mark_invalid asks incompatibility() once per combination of the method sections and world: every cell gets
    the answer its own config gives, and the cells that were not asked keep their config unbuilt."""
    from bench.runner.components import incompatibility
    from bench.runner.grid import expand_grid, mark_invalid

    _, cells = expand_grid("elbo_vs_stepwise", ["grid.tune=null"])  # 3 x 2 x 2 methods x 5 seeds
    mark_invalid(cells)
    unbuilt = [c for c in cells if c.values is not None]
    assert len(unbuilt) >= len(cells) - 1  # expand_grid builds the first cell's config to check the grid
    assert {c.skip_reason for c in cells} == {None, "estimator 'stepwise' needs SDE edges but sampler 'ode' has none"}
    for cell in cells:
        assert cell.skip_reason == incompatibility(cell.cfg), cell.name


def test_validation_runs_once_per_distinct_set_of_checked_sections_and_still_finds_a_bad_cell(monkeypatch) -> None:
    """validate_cells checks each combination of world, train and method sections once (seeds differ only in
    their eval noise seed, which no check reads), and a cell that differs in a checked value is checked itself."""
    import pytest

    from bench.core.errors import UserError
    from bench.runner import grid as grid_module
    from bench.runner.grid import expand_grid, validate_cells

    _, cells = expand_grid("elbo_vs_stepwise", ["grid.tune=null"])  # 3 x 2 x 2 methods and a control, x 5 seeds
    methods = {c.method for c in cells}
    assert len(methods) == 13 and len(cells) == 65
    seen: list[str] = []
    real = grid_module.validate_cell
    monkeypatch.setattr(grid_module, "validate_cell",
                        lambda cfg, check_files=True: (seen.append(cfg.sampler.name), real(cfg, check_files))[1])
    validate_cells(cells)
    assert len(seen) == 13  # one per method: its seeds differ only in seed-derived values
    monkeypatch.setattr(grid_module, "validate_cell", real)
    bad = cells[-1]
    assert bad.values is not None
    bad.values = {**bad.values, "world": {**bad.values["world"], "device": "cuda:7"}}  # no such device here: check_device names it
    with pytest.raises(UserError, match="cuda:7"):
        validate_cells(cells)
