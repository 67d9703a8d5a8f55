"""`python -m bench.perf sd3` (issue 13 item 9): one row per method preset with the iteration's split and peak memory;
sizes default to tiny on the tiny variant and to the SD3.5 grids' (G=24, 512 px) elsewhere; bad options exit 2."""
from __future__ import annotations

import pytest

from bench import perf
from bench.perf.sd3 import size_overrides


def test_sizes_follow_the_variant() -> None:
    assert size_overrides("tiny", None, None, None, None) == [
        "train.prompts_per_iter=2", "train.group_size=4", "sampler.steps=10"]
    assert size_overrides("random_full", None, None, None, None) == [
        "train.prompts_per_iter=2", "train.group_size=24", "sampler.steps=10", "world.resolution=512"]
    assert size_overrides("random_full", 1, 12, 1024, 20)[1:] == [
        "train.group_size=12", "sampler.steps=20", "world.resolution=1024"]


def test_table_has_a_row_per_preset_whose_phases_add_up(capsys: pytest.CaptureFixture) -> None:
    rc = perf.main(["sd3", "--presets", "flow_grpo,nft", "--iterations", "1", "--warmup", "0", "--group-size", "2",
                    "--prompts", "1", "world.variant=tiny"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "P=1 G=2 steps=10" in out and "dtype=float32" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("flow_grpo", "nft"))}
    assert set(rows) == {"flow_grpo", "nft"}
    for cells in rows.values():
        wall, *phases = map(float, cells[1:8])  # s/iter, then rollout .. other
        assert abs(sum(phases) - wall) <= 0.004  # each printed to 3 decimals
        assert 0 < float(cells[8]) <= wall and float(cells[10]) > 0  # outside model calls; peak MB


@pytest.mark.parametrize("argv, message", [(["--presets", "flow_grpo,bogus"], "unknown method 'bogus'"),
                                           (["--group-size", "0"], "--group-size=0")])
def test_bad_options_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert perf.main(["sd3", *argv, "world.variant=tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
