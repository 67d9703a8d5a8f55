"""`pip install .` ships what the runner reads at run time (issue 13 item 11): the Hydra configs and prompt files
under experiments/ (found beside bench/ in site-packages as in a checkout), the shapes world's weights and
SD3.5-Medium's published configs. Builds the wheel from a copy of the sources (the checkout stays untouched)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("bench", "samplers", "estimators", "objectives", "experiments", "pyproject.toml", "README.md")


def test_wheel_ships_configs_prompts_and_weights(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("diffrl_bench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "experiments").rglob("*")
               if p.is_file() and p.suffix in (".yaml", ".txt", ".jsonl")}
    assert configs and configs <= names, sorted(configs - names)[:5]
    assert {"experiments/grid/smoke.yaml", "experiments/config.yaml", "bench/worlds/configs/sd35_medium/transformer.json",
            "bench/worlds/weights/shapes_base.safetensors"} <= names
