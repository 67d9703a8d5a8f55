"""Prompt files (.txt / .jsonl with metadata), train/eval splits, and the shipped examples."""
from __future__ import annotations

import json

import pytest

from bench.core.errors import UserError
from bench.worlds.prompts import PROMPTS_DIR, load_prompts, train_eval_split


def test_txt_skips_blank_lines_and_comments(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\n a cat \n\nthe dog\n# another\nthe dog\n")
    ps = load_prompts(f)
    assert ps.prompts == ["a cat", "the dog", "the dog"] and ps.metadata == {}


def test_jsonl_keeps_metadata(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [{"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "two cats"},
            {"prompt": "a dog"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ps = load_prompts(f)
    assert ps.prompts == ["two cats", "a dog"]
    assert ps.metadata["two cats"] == {"tag": "counting", "include": [{"class": "cat", "count": 2}]}
    assert ps.metadata["a dog"] == {}


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="prompt file 'nope.txt' not found.*geneval_style.jsonl"):
        load_prompts("nope.txt")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "noprompt.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(UserError, match=r'noprompt.jsonl:1: each JSONL line needs a string "prompt" field'):
        load_prompts(tmp_path / "noprompt.jsonl")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UserError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(UserError, match="world.prompts.train is not set"):
        train_eval_split({})


def test_hash_split_is_disjoint_stable_and_seeded(tmp_path):
    f = tmp_path / "many.txt"
    f.write_text("\n".join(f"prompt number {i}" for i in range(400)))
    train, evals = train_eval_split({"train": str(f), "eval_fraction": 0.25})
    assert not set(train.prompts) & set(evals.prompts)
    assert len(train) + len(evals) == 400 and 60 < len(evals) < 140
    # Growing the file never moves a prompt between the splits.
    f.write_text(f.read_text() + "\n" + "\n".join(f"new prompt {i}" for i in range(50)))
    train2, evals2 = train_eval_split({"train": str(f), "eval_fraction": 0.25})
    assert set(evals.prompts) <= set(evals2.prompts) and set(train.prompts) <= set(train2.prompts)
    _, other = train_eval_split({"train": str(f), "eval_fraction": 0.25, "split_seed": 1})
    assert set(other.prompts) != set(evals2.prompts)
    _, capped = train_eval_split({"train": str(f), "eval_fraction": 0.25, "eval_max": 5})
    assert capped.prompts == evals2.prompts[:5]


def test_separate_eval_file_and_shipped_examples():
    train, evals = train_eval_split({"train": "simple_objects.txt", "eval": "geneval_style.jsonl"})
    assert len(train) == 32 and len(evals) == 28
    tags = {m["tag"] for m in evals.metadata.values()}
    assert tags == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert (PROMPTS_DIR / "simple_objects.txt").exists()
