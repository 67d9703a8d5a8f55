"""`python -m bench.run grid=NAME [overrides]`: expand a grid, train every cell, write summary, plots, report.

Every cell's config is resolved and checked against the declared schemas before anything is written; a cell is
identified by the hash of what it computes (bench/runner/resolve.py), so a rerun reuses finished cells of the same config,
resumes unfinished ones, and refuses (one line, exit 2, nothing written) to mix cells of another config into a
results folder. Cells run where `launcher=` says (local, parallel, slurm: bench/runner/launchers.py), each under its lock.
`--help` lists grids, groups and axes; `--cfg job` (or `--dry-run`) prints the cells and what would run.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from bench.runner import distributed, store
from bench.runner.cli_help import help_text
from bench.runner.components import fallback_warnings, plain
from bench.runner.config import split_override
from bench.core.errors import UserError
from bench.reporting.fidelity import run_fidelity
from bench.runner.freshness import is_fresh, mark_fresh, report_key
from bench.runner.execute import FINAL, Task, read_base_metrics, read_identity, run_cell  # noqa: F401 (public: bench.run.run_cell)
from bench.runner.grid import Cell, expand_grid, mark_invalid, unused_keys, validate_cells
from bench.runner.launchers import build_launcher, check_launcher, drive
from bench.runner.loggers import check_logger
from bench.reporting.report import write_report
from bench.runner.resolve import config_diff, identity
from bench.runner.tuning import TuneSpec, choose, method_templates, report_cells, setting_label, tune_spec, tuning_cells
from bench.reporting.summary import (build_summary, flatten, read_manifest, seed_derived_keys, write_manifest,
                                     write_summary)



def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    grid, rest = None, []
    for item in argv:
        key, value = split_override(item)
        if key == "grid":
            grid = value
        else:
            rest.append(item)
    if grid is None:
        raise UserError("no grid given; run python -m bench.run grid=NAME (python -m bench.run --help lists them)")
    return grid, rest


def split_flags(argv: list[str]) -> tuple[list[str], bool, bool]:
    """(overrides, help wanted, dry run wanted); `--cfg job` / `--cfg=job` / `-c job` / `--dry-run` are dry runs."""
    out, want_help, dry, i = [], False, False, 0
    while i < len(argv):
        a = argv[i]
        if a in ("--help", "-h"):
            want_help = True
        elif a in ("--cfg", "-c") or a.startswith("--cfg="):
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 0 if "=" in a else 1
            if value != "job":
                raise UserError(f"--cfg {value}: unknown; valid: --cfg job (prints every cell's resolved config)")
            dry = True
        elif a == "--dry-run":
            dry = True
        elif a.startswith("-"):
            raise UserError(f"{a}: unknown flag; valid: --help, --cfg job, --dry-run")
        else:
            out.append(a)
        i += 1
    return out, want_help, dry


def prepare(argv: list[str], dry: bool = False) -> tuple[str, DictConfig, list[Cell]]:
    """The grid's cells, every one checked; a dry run skips the machine-specific checks (weights, devices), so
    a cluster's configs can be inspected anywhere."""
    grid_name, overrides = parse_args(argv)
    base, cells = expand_grid(grid_name, overrides)
    validate_cells(cells, check_files=not dry)
    for line in fallback_warnings(base):
        print(line, file=sys.stderr)
    mark_invalid(cells)
    if not any(c.skip_reason is None for c in cells):
        reasons = sorted({c.skip_reason for c in cells})
        raise UserError(f"every cell of grid '{grid_name}' is invalid: {'; '.join(reasons)}")
    check_launcher(base)
    check_logger(base)
    for key, members in unused_keys([c for c in cells if c.skip_reason is None]).items():
        print(f"warning: {key} applies to no cell of this run (an option of {', '.join(members)})", file=sys.stderr)
    return grid_name, base, cells


def _shared(ident: dict, axes: set[str]) -> dict:
    """A cell identity without its axis keys and seed: what every cell of one grid folder has in common."""
    def strip(d: dict, keys: set[str]) -> dict:
        out = {}
        for k, v in d.items():
            if k in keys:
                continue
            inner = {key.split(".", 1)[1] for key in keys if "." in key and key.split(".", 1)[0] == k}
            out[k] = strip(v, inner) if inner and isinstance(v, dict) else v
        return out
    return strip(ident, {*axes, "seed"})


def _seed_dependent(cells: list[Cell], ident: Callable[[Cell], dict]) -> set[str]:
    """Dotted keys that are a seed's own random streams in this run (`${derived_seed:${seed},1}`): the summary's
    rule (bench.reporting.summary.seed_derived_keys), method by method."""
    by_method: dict[str, list[Cell]] = {}
    for c in cells:
        if c.has_config and c.skip_reason is None:
            by_method.setdefault(c.method, []).append(c)
    keys: set[str] = set()
    for group in by_method.values():
        configs = {c.name: flatten(ident(c)) for c in group}
        keys |= seed_derived_keys(list(configs), configs, {c.name: c.seed for c in group})
    return keys


def plan_cells(grid_dir: Path, cells: list[Cell], earlier: list[Cell]) -> dict[str, str]:
    """What each cell of this run will do (run | resume | reuse | skip), or UserError if the folder holds work
    done under another config: a cell of the same name with another hash, or earlier cells of this grid whose
    common settings differ from this run's (they would be pooled in one report)."""
    plan: dict[str, str] = {}
    valid = [c for c in cells if c.skip_reason is None]
    identities: dict[int, dict] = {}

    def ident(c: Cell) -> dict:  # a cell's identity, computed once (a config to plain values is ms)
        if c.identity is not None:
            return c.identity
        if id(c) not in identities:
            identities[id(c)] = identity(c.cfg)
        return identities[id(c)]

    for cell in cells:
        if cell.skip_reason is not None:
            plan[cell.name] = "skip"
            continue
        stored = read_identity(grid_dir / cell.name)
        if stored is not None and stored["hash"] != cell.hash:
            raise UserError(f"{grid_dir / cell.name} was run with another config "
                            f"({config_diff(stored['identity'], ident(cell))}); give another results_dir= "
                            "to keep both, or remove that folder")
        status = store.read_status(grid_dir / cell.name)["status"]
        plan[cell.name] = ("reuse" if status in FINAL and stored is not None
                           else "resume" if stored is not None and store.has_checkpoint(grid_dir / cell.name) else "run")
    names = {c.name for c in cells}
    # What may differ between cells of one folder: the axes, the tuned keys, and for tuning runs budget.until.
    axes = {a for c in [*cells, *earlier] for a in [*c.axes, *c.setting] if a != "of"}
    if any(c.stage == "tune" for c in [*cells, *earlier]):
        axes.add("budget.until")
    axes |= _seed_dependent(cells, ident)
    # An earlier cell is compared with this run's cell of its own method (a tuning run with the method it tuned:
    # presets on a method axis differ in more than the axis), else with any cell of this run.
    by_method = {c.method: c for c in valid}
    shared: dict[int, dict] = {}
    for old in earlier:
        stored = read_identity(grid_dir / old.name) if old.name not in names else None
        ref = by_method.get(str(old.setting.get("of", old.method)), valid[0])
        if id(ref) not in shared:
            shared[id(ref)] = _shared(ident(ref), axes)
        mine = shared[id(ref)]
        if stored is not None and _shared(stored["identity"], axes) != mine:
            raise UserError(f"{grid_dir} holds cells run with another config ({config_diff(_shared(stored['identity'], axes), mine)}, "
                            f"e.g. {old.name}); give another results_dir= to keep both")
    return plan


def open_results(base: DictConfig, grid_name: str) -> Path:
    """The grid's results folder, refused (UserError, nothing written) if it is not writable or was written in
    another results format; otherwise created and stamped with this version."""
    grid_dir = Path(base.results_dir) / grid_name
    store.check_writable(grid_dir)
    store.check_results_version(grid_dir)
    grid_dir.mkdir(parents=True, exist_ok=True)
    store.write_results_version(grid_dir)
    return grid_dir


def write_grid_meta(grid_name: str, base: DictConfig, cells: list[Cell], grid_dir: Path) -> None:
    """grid.yaml (what the report needs of the grid config) and cells.json (every cell of the folder: this run's
    and earlier runs'), written before any cell runs, so `python -m bench.report` works while cells run."""
    b = base.budget
    budget = ", ".join(f"{k}={b[k]}" for k in ("nfe", "device_hours", "iterations") if b.get(k) is not None)
    until = b.get("until")
    if until is not None:
        budget += (f"; past it, training goes on until {until.metric} reaches {until.value:g} (first crossing), at "
                   f"most to {until.cap_nfe} NFE")
    grid_cfg = {**plain(base.grid), "name": grid_name, "budget_text": budget, "budget_nfe": b.get("nfe"),
                "cap_nfe": until.cap_nfe if until is not None else None}
    store.atomic_write_text(grid_dir / "grid.yaml", yaml.safe_dump(grid_cfg, sort_keys=False))
    write_manifest(grid_dir, cells)


def with_earlier(cells: list[Cell], earlier: list[Cell]) -> list[Cell]:
    """This run's cells followed by the folder's earlier cells that this run does not name (a restricted rerun or a
    sweep split over invocations never drops cells from the report)."""
    names = {c.name for c in cells}
    return [*cells, *(c for c in earlier if c.name not in names)]


def finish(grid_name: str, base, cells: list[Cell], grid_dir: Path, base_metrics: dict | None) -> Path:
    # Nothing the summary or report is built from changed since they were (a rerun of a finished grid): keep them.
    key = report_key(grid_dir, plain(base.grid), cells)
    if is_fresh(grid_dir, key):
        return grid_dir / "report.md"
    df = build_summary(grid_name, grid_dir, cells, base_metrics)
    write_summary(df, grid_dir)
    write_grid_meta(grid_name, base, cells, grid_dir)
    report = write_report(grid_dir)
    mark_fresh(grid_dir, key)
    return report


def print_plan(cells: list[Cell], plan: dict[str, str], grid_dir: Path, show_configs: bool) -> None:
    counts = {k: sum(v == k for v in plan.values()) for k in ("run", "resume", "reuse", "skip")}
    for cell in cells:
        print(f"# {cell.name}: {plan[cell.name]}" + (f" ({cell.skip_reason})" if cell.skip_reason else "")
              + (f"  hash={cell.hash}" if cell.hash else ""))
        if show_configs and cell.skip_reason is None:
            print(OmegaConf.to_yaml(cell.cfg, resolve=True))
    print(f"{len(cells)} cells in {grid_dir}: {counts['run']} to run, {counts['resume']} to resume, "
          f"{counts['reuse']} reused, {counts['skip']} skipped (dry run: nothing written)")


EXIT_DISK_FULL = 3  # exit codes: 0 done or diverged, 1 a cell crashed, 2 bad input, 3 disk full, 130 Ctrl-C


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        overrides, want_help, dry = split_flags(argv)
        if want_help:
            print(help_text(overrides))
            return 0
        grid_name, base, cells = prepare(overrides, dry=dry)
        grid_dir = Path(base.results_dir) / grid_name
        store.check_writable(grid_dir)
        store.check_results_version(grid_dir)
        earlier = (read_manifest(grid_dir) or []) if grid_dir.is_dir() else []
        spec = tune_spec(base, sorted({c.seed for c in cells}))
        templates = cells
        if spec is not None:  # stage 1 is the tuning sweep; the compared cells follow from its outcome
            cells = tuning_cells(method_templates(templates), spec)
        if base.grid.get("kind", "train") != "fidelity":
            plan = plan_cells(grid_dir, cells, earlier)
        if dry:
            if base.grid.get("kind", "train") == "fidelity":
                print(OmegaConf.to_yaml(base, resolve=True))
                return 0
            show = any(a.startswith(("--cfg", "-c")) for a in argv)
            print_plan(cells, plan, grid_dir, show_configs=show)
            if spec is not None:
                if all(plan[c.name] in ("reuse", "skip") for c in cells):
                    compared = compared_cells(grid_dir, templates, cells, spec)
                    print_plan(compared, plan_cells(grid_dir, compared, [*earlier, *cells]), grid_dir, show_configs=show)
                else:
                    n = sum(t.skip_reason is None for t in templates)
                    print(f"then {n} cells at each method's chosen setting (known once tuning has run)")
            return 0
        distributed.init()  # accelerate launch / torchrun: join the ranks before any world is built
        if distributed.is_main():
            open_results(base, grid_name)
        distributed.barrier()
        if base.grid.get("kind", "train") == "fidelity":  # a measurement of estimators, not a training grid
            return run_fidelity(grid_name, base, cells[0].overrides, grid_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if distributed.active():  # every rank trains each cell together; rank 0 writes (bench/runner/distributed.py)
        return data_parallel(grid_name, base, templates, cells, earlier, grid_dir, spec)
    valid = [c for c in cells if c.skip_reason is None]
    skipped = [c for c in cells if c.skip_reason is not None]
    every = with_earlier(cells, earlier)
    tasks = [Task("base", valid[0]), *(Task("cell", c) for c in valid)]
    for reason in sorted({c.skip_reason for c in skipped}):
        n = sum(c.skip_reason == reason for c in skipped)
        print(f"skipping {n} cell(s): {reason}")
    counts = {k: sum(v == k for v in plan.values()) for k in ("run", "resume", "reuse")}
    print(f"{len(valid)} cells: {counts['run']} to run, {counts['resume']} to resume, {counts['reuse']} reused "
          "(finished under the same config)")
    try:
        write_grid_meta(grid_name, base, every, grid_dir)
        results = drive(build_launcher(base), tasks, grid_dir, poll_s=float(base.launcher.get("poll_s", 10)))
        if spec is not None:
            try:
                compared = compared_cells(grid_dir, templates, cells, spec)
                plan = plan_cells(grid_dir, compared, every)
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            ok = [c for c in compared if c.skip_reason is None]
            print(f"{len(ok)} cells at the chosen settings: {sum(plan[c.name] == 'run' for c in ok)} to run, "
                  f"{sum(plan[c.name] == 'resume' for c in ok)} to resume, {sum(plan[c.name] == 'reuse' for c in ok)} reused")
            every = with_earlier([*cells, *compared], earlier)
            write_grid_meta(grid_name, base, every, grid_dir)
            results.update(drive(build_launcher(base), [Task("cell", c) for c in ok], grid_dir,
                                 poll_s=float(base.launcher.get("poll_s", 10))))
            valid, skipped = [*valid, *ok], [*skipped, *(c for c in compared if c.skip_reason is not None)]
        return summarise(grid_name, base, every, grid_dir, results, len(valid), len(skipped))
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to resume from the cells' checkpoints ({grid_dir})", file=sys.stderr)
        return 130
    except (store.DiskFull, OSError) as e:  # every cell stays resumable (bench/runner/store.py); nothing to report
        full = store.disk_full(e, grid_dir)
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return EXIT_DISK_FULL


def compared_cells(grid_dir: Path, templates: list[Cell], tune: list[Cell], spec: TuneSpec) -> list[Cell]:
    """The cells of the comparison, each method at the setting its tuning runs chose (printed)."""
    chosen = choose(grid_dir, tune, spec)
    for method, c in chosen.items():
        print(f"tuned {method}: {setting_label(c.setting)} (mean {spec.select} of {spec.metric} over "
              f"{len(spec.seeds)} tuning seeds: {max(s[1] for s in c.scores):.3f})")
    compared = report_cells(method_templates(templates), sorted({c.seed for c in templates}), chosen)
    made = [c for c in compared if c.skip_reason is None]
    mark_invalid(made)
    return compared


def data_parallel(grid_name: str, base: DictConfig, templates: list[Cell], cells: list[Cell], earlier: list[Cell],
                  grid_dir: Path, spec: TuneSpec | None) -> int:
    """Every rank trains each cell together; rank 0 writes (bench/runner/distributed.py). With grid.tune every
    rank reads the same finished tuning runs, so all choose the same settings."""
    valid = [c for c in cells if c.skip_reason is None]
    every = with_earlier(cells, earlier)
    if distributed.is_main():
        print(f"data-parallel over {distributed.world_size()} processes; rank 0 writes {grid_dir}", flush=True)
        write_grid_meta(grid_name, base, every, grid_dir)
    results = drive(build_launcher(base), [Task("base", valid[0]), *(Task("cell", c) for c in valid)], grid_dir)
    n_skipped = len(cells) - len(valid)
    if spec is not None:
        distributed.barrier()
        compared = compared_cells(grid_dir, templates, cells, spec)
        ok = [c for c in compared if c.skip_reason is None]
        every = with_earlier([*cells, *compared], earlier)
        if distributed.is_main():
            write_grid_meta(grid_name, base, every, grid_dir)
        results.update(drive(build_launcher(base), [Task("cell", c) for c in ok], grid_dir))
        valid, n_skipped = [*valid, *ok], n_skipped + len(compared) - len(ok)
    if not distributed.is_main():
        return 0
    return summarise(grid_name, base, every, grid_dir, results, len(valid), n_skipped)


def summarise(grid_name: str, base: DictConfig, every: list[Cell], grid_dir: Path, results: dict[str, str],
              n_valid: int, n_skipped: int) -> int:
    """Summary, plots and report of every cell of the folder; prints the outcome; the exit code (1: a crash)."""
    results.pop("base", None)
    report = finish(grid_name, base, every, grid_dir, read_base_metrics(grid_dir))
    status = {n: store.read_status(grid_dir / n) for n in results}
    diverged = {n: s.get("error") or "" for n, s in status.items() if s["status"] == "diverged"}
    failed = {n: status[n].get("error") or f"its runner gave up ({r})" for n, r in results.items()
              if n not in diverged and (r == "failed" or status[n]["status"] == "failed")}
    print(f"{n_valid - len(failed) - len(diverged)} cells done, {len(diverged)} diverged, {len(failed)} failed, "
          f"{n_skipped} skipped -> {report}")
    for name, error in {**diverged, **failed}.items():
        print(f"  {'diverged' if name in diverged else 'failed'} {name}: {error}")
    # A diverged cell is a result of the benchmark, reported like any other; a cell that crashed is a bug or a
    # broken setup, and the exit code says so.
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
