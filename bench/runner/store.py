"""Per-cell result files: status, resolved config, metrics.jsonl and checkpoints (DESIGN section 10)."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from bench.core.errors import UserError
from bench.runner.locks import CellLock
from bench.runner.statefile import CorruptStateFile, load_state, peek, save_state
from bench import __version__

STATUS_FILE, METRICS_FILE, CONFIG_FILE = "status.json", "metrics.jsonl", "config.yaml"
LOCK_FILE, RUNS_FILE, VERSION_FILE = "lock", "runs.jsonl", "VERSION"
T = TypeVar("T")

# The layout of results/<grid>/ (file names, metrics.jsonl rows, status values). Bump it when a change would make
# an older runner or report misread a folder; folders without a VERSION file were written by the foundation
# runner, whose layout is format 1.
RESULTS_FORMAT = 2  # 2: cells carry identity.json (their config hash); checkpoints are safetensors


# A full disk (or quota) is no fault of a cell: the run stops with one line (DiskFull, exit code 3 in bench.run)
# and every cell stays resumable, since each file is replaced atomically or appended whole.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFull(Exception):
    """No space left (or over quota) while writing `path`; pickles (a worker's error reaches its runner)."""

    def __init__(self, path: str, reason: str = "No space left on device"):
        super().__init__(str(path), reason)
        self.path, self.reason = str(path), reason

    def __str__(self) -> str:
        return f"disk full writing '{self.path}' ({self.reason}); free space and rerun the same command to resume"


def disk_full(e: BaseException, where: Path | str | None = None) -> DiskFull | None:
    """The DiskFull that `e` is or was caused by (a raw ENOSPC/EDQUOT OSError names its file, else `where`)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, DiskFull):
            return cur
        if isinstance(cur, OSError) and cur.errno in _FULL_ERRNOS:
            return DiskFull(cur.filename or where or "the results folder", cur.strerror or os.strerror(cur.errno))
        cur = cur.__cause__ or cur.__context__
    return None


@contextlib.contextmanager
def naming_full_disk(path: Path | str) -> Iterator[None]:
    """Re-raise a full-disk OSError inside the block as DiskFull naming `path`."""
    try:
        yield
    except OSError as e:
        full = disk_full(e, path)
        if full is None:
            raise
        raise full from e


def _tmp_name(path: Path) -> Path:
    # pid and thread in the name: concurrent writers of one file (two runners finishing a grid) never share a temp.
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not fsync directories; the rename is still atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temp path to write; on success it is fsynced and renamed onto `path` (a reader sees the old or
    the new file, never half of one); on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with naming_full_disk(path):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Temp file + rename: a reader sees the old or the new file, never half of one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_stale_temps(folder: Path) -> int:
    """Delete temp files left in `folder` (and its subfolders) by writers killed mid-write; call it only while
    holding the folder's lock, when no live writer can own one."""
    n = 0
    for tmp in Path(folder).rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


def cached(path: Path, load: Callable[[Path], T], build: Callable[[], T], save: Callable[[T, Path], None],
           echo: Callable[[str], None] | None = None) -> T:
    """The object cached at `path` (results/cache/: pretrained models, judges), built and saved atomically when
    missing; a file that does not load (torn, corrupt, from an incompatible version) is named in one line and
    rebuilt in its place."""
    path = Path(path)
    if path.exists():
        try:
            return load(path)
        except MemoryError:
            raise
        except Exception as e:  # unpickling and torch.load raise many types for a damaged file
            first = (str(e).strip().splitlines() or [""])[0][:200]
            (echo or _warn)(f"warning: cache file '{path}' does not load ({type(e).__name__}: {first}); rebuilding it")
    obj = build()
    with atomic_path(path) as tmp:
        save(obj, tmp)
    return obj


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def bench_version() -> str:

    return __version__


def check_results_version(grid_dir: Path) -> None:
    """Refuse a results folder written in another results format (one-line UserError naming both versions)."""
    path = Path(grid_dir) / VERSION_FILE
    try:
        found = json.loads(path.read_text())
        fmt, by = int(found["results_format"]), found.get("bench_version", "unknown")
    except FileNotFoundError:
        return
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UserError(f"'{path}' is not a diffrl-bench VERSION file; refusing to write into '{grid_dir}'") from None
    if fmt != RESULTS_FORMAT:
        raise UserError(f"'{grid_dir}' holds results format {fmt} (written by diffrl-bench {by}); this is diffrl-bench "
                        f"{bench_version()} with results format {RESULTS_FORMAT}: use a matching version or another "
                        "results_dir")


def write_results_version(grid_dir: Path) -> None:
    path = Path(grid_dir) / VERSION_FILE
    if not path.exists():
        atomic_write_text(path, json.dumps({"results_format": RESULTS_FORMAT, "bench_version": bench_version()}) + "\n")


def check_writable(folder: Path) -> None:
    """UserError unless `folder` exists as a writable directory or could be created; writes nothing that stays."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"results folder '{folder}' is not writable: '{probe}' is not a directory")
    try:  # os.access lies for root and on some network filesystems: really try
        fd, name = tempfile.mkstemp(prefix=".write-probe-", suffix=".tmp", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f"results folder '{folder}' is not writable: {e.strerror or e} ('{probe}')") from None


def read_status(cell_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(cell_dir) / STATUS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"status": "pending"}


def write_status(cell_dir: Path, status: str, **extra: Any) -> None:
    atomic_write_text(Path(cell_dir) / STATUS_FILE, json.dumps({"status": status, **extra}, indent=1))


def note_interrupted(cell_dir: Path, reason: str) -> None:
    """Best effort: status "interrupted" with why (on a full disk this write may fail too; a rerun resumes the
    cell either way, its lock being stale)."""
    try:
        write_status(cell_dir, "interrupted", error=reason)
    except (DiskFull, OSError):
        pass


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


def _drop_torn_tail(fd: int) -> None:
    """Cut a last line without its newline (a writer killed mid-line, or a disk that filled up): appended to, it
    would garble the next row. Callers append under the cell's lock, so no live writer owns that piece."""
    size = os.fstat(fd).st_size
    if not size or os.pread(fd, 1, size - 1) == b"\n":
        return
    end = size
    while end > 0:
        start = max(0, end - 65536)
        cut = os.pread(fd, end - start, start).rfind(b"\n")
        if cut >= 0:
            os.ftruncate(fd, start + cut + 1)
            return
        end = start
    os.ftruncate(fd, 0)


# Appended without fsync (append_jsonl): metrics rows, which every checkpoint also holds (restore_metrics).
UNSYNCED = (METRICS_FILE,)


def append_jsonl(path: Path, row: dict[str, Any], sync: bool | None = None) -> None:
    """Append one JSON line with a single write(2) on an O_APPEND descriptor, then (`sync`) fsync: the line is on
    disk when this returns, and a crash loses at most the line in flight (left torn, without its newline, and cut
    by the next append). Without `sync` a killed process still loses nothing written (the kernel holds it); only
    a machine crash can lose the lines since the last fsync. `sync` None: every file but UNSYNCED ones."""
    if sync is None:
        sync = Path(path).name not in UNSYNCED
    data = (json.dumps({k: _clean(v) for k, v in row.items()}) + "\n").encode()
    with naming_full_disk(path):
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _drop_torn_tail(fd)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete rows. A row counts only once its newline is written, so a torn last line (killed mid-write)
    is ignored even when its prefix happens to parse; reading stops at the first undecodable line."""
    try:
        text = Path(path).read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.split("\n")[:-1]:  # the piece after the last newline is a line in flight
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(row, dict):
            break
        rows.append(row)
    return rows


def append_metrics(cell_dir: Path, row: dict[str, Any]) -> None:
    """One JSON line per iteration, written before the iteration's checkpoint; not fsynced (a syscall that stalls
    the loop for milliseconds): every checkpoint holds the rows up to its iteration and is fsynced, and a resume
    rewrites metrics.jsonl from it, so a machine crash loses no row the resumed cell does not recompute."""
    append_jsonl(Path(cell_dir) / METRICS_FILE, row)


def read_metrics(cell_dir: Path) -> list[dict[str, Any]]:
    """All complete rows of metrics.jsonl; a torn last line (killed mid-write) is ignored."""
    return read_jsonl(Path(cell_dir) / METRICS_FILE)


def record_attempt(cell_dir: Path, **info: Any) -> None:
    """Append who ran the cell when to runs.jsonl: provenance across resumes, requeues and several runners."""
    append_jsonl(Path(cell_dir) / RUNS_FILE, {"host": socket.gethostname(), "pid": os.getpid(),
                                              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), **info})


def truncate_metrics(cell_dir: Path, last_iteration: int) -> None:
    """Keep only rows up to the checkpointed iteration, so a resumed run never duplicates one."""
    rows = [r for r in read_metrics(cell_dir) if r["iteration"] <= last_iteration]
    atomic_write_text(Path(cell_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


# -- checkpoints ---------------------------------------------------------------------------------------------
# checkpoint-<iteration>.safetensors (bench/runner/statefile.py: no pickle), the newest `keep` of them. Each one also
# holds the metrics rows up to its iteration, so a resume rewrites metrics.jsonl from the checkpoint it resumes
# and a torn, truncated or garbled metrics file never loses a row. A checkpoint that does not read back is
# renamed to <name>.corrupt, named in one line, and the next older one is tried (then: from scratch).
CHECKPOINT_GLOB, CORRUPT_SUFFIX = "checkpoint-*.safetensors", ".corrupt"


def checkpoint_path(cell_dir: Path, iteration: int) -> Path:
    return Path(cell_dir) / f"checkpoint-{int(iteration):06d}.safetensors"


def checkpoint_iteration(path: Path) -> int | None:
    """The iteration in a checkpoint's file name (None for a name that is not one)."""
    try:
        return int(Path(path).stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return None


def checkpoint_paths(cell_dir: Path) -> list[Path]:
    """The cell's checkpoint files, newest (highest iteration) first; names only, not validated."""
    found = [(checkpoint_iteration(p), p) for p in Path(cell_dir).glob(CHECKPOINT_GLOB)]
    return [p for it, p in sorted((f for f in found if f[0] is not None), reverse=True)]


def has_checkpoint(cell_dir: Path) -> bool:
    return bool(checkpoint_paths(cell_dir))


def save_checkpoint(cell_dir: Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Write the checkpoint of iteration state["iteration"] with the metrics rows up to it, atomically, then
    delete all but the newest `keep` checkpoints."""
    cell_dir, iteration = Path(cell_dir), int(state["iteration"])
    rows = [r for r in read_metrics(cell_dir) if r["iteration"] <= iteration]
    if [r["iteration"] for r in rows] != list(range(iteration + 1)):
        raise RuntimeError(f"'{cell_dir / METRICS_FILE}' holds iterations {[r['iteration'] for r in rows]} at "
                           f"iteration {iteration}: it was changed while the cell ran")
    path = checkpoint_path(cell_dir, iteration)
    with atomic_path(path) as tmp:
        save_state({**state, "metrics_rows": rows}, tmp)
    for old in checkpoint_paths(cell_dir)[max(1, int(keep)):]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(cell_dir: Path, echo: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """The newest checkpoint that reads back, or None (start from scratch). Each unreadable one is renamed to
    <name>.corrupt and named in one line (to stderr unless `echo` is given)."""
    echo = echo or _warn
    for path in checkpoint_paths(cell_dir):
        try:
            state = load_state(path)
        except CorruptStateFile as e:
            aside = path.with_name(path.name + CORRUPT_SUFFIX)
            os.replace(path, aside)
            older = checkpoint_paths(cell_dir)
            then = f"resuming from '{older[0].name}'" if older else "restarting the cell from scratch"
            echo(f"warning: checkpoint '{path}' is corrupt ({e}); moved to '{aside.name}', {then}")
            continue
        state["path"] = str(path)
        return state
    return None


def restore_metrics(cell_dir: Path, ckpt: dict[str, Any]) -> None:
    """metrics.jsonl as it was when `ckpt` was written: its rows, whatever happened to the file since."""
    rows = ckpt["metrics_rows"]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path = Path(cell_dir) / METRICS_FILE
    try:
        if path.read_text() == text:
            return
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)


VERIFIED_FILE = ".metrics_checked"  # size and mtime of a finished cell's metrics.jsonl when last checked intact


def file_stamp(path: Path) -> str | None:
    """'size mtime_ns' of a file (None if it is not there): unchanged means not rewritten since."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return f"{st.st_size} {st.st_mtime_ns}"


NOT_KEPT = object()  # kept_answer: nothing kept under that key


def kept_answer(path: Path, key: Any) -> Any:
    """What keep_answer stored at `path` under `key` (a file stamp and whatever else the answer depends on), or
    NOT_KEPT when the file is missing, unreadable or holds another key."""
    try:
        saved = json.loads(Path(path).read_text())
        return saved["value"] if saved["key"] == json.loads(json.dumps(key)) else NOT_KEPT
    except (FileNotFoundError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return NOT_KEPT


def keep_answer(path: Path, key: Any, value: Any) -> None:
    """Store a JSON value under `key` for kept_answer; a read-only folder keeps nothing (asked again next time)."""
    try:
        atomic_write_text(Path(path), json.dumps({"key": key, "value": value}))
    except OSError:
        pass


def repair_finished_metrics(cell_dir: Path, echo: Callable[[str], None] | None = None) -> bool:
    """A finished cell whose metrics.jsonl lost rows (truncated, torn, garbled past some row) gets them back from
    its final checkpoint, with one line saying so; True if it was repaired."""
    # A file checked before and untouched since (same size and mtime) needs no second look: reading it and the
    # checkpoint is most of what a rerun of a finished grid would spend on its cells.
    marker, stamp = Path(cell_dir) / VERIFIED_FILE, file_stamp(Path(cell_dir) / METRICS_FILE)
    if stamp is not None and kept_answer(marker, stamp) is not NOT_KEPT:
        return False
    ckpts = checkpoint_paths(cell_dir)
    if not ckpts:
        return False
    rows = read_metrics(cell_dir)
    try:
        saved = peek(ckpts[0], "metrics_rows")
    except (CorruptStateFile, KeyError):
        return False
    if rows == saved or rows != saved[: len(rows)]:  # intact, or changed rather than cut: leave it alone
        if stamp is not None:
            keep_answer(marker, stamp, True)
        return False
    restore_metrics(cell_dir, {"metrics_rows": saved})
    (echo or _warn)(f"warning: '{Path(cell_dir) / METRICS_FILE}' had lost {len(saved) - len(rows)} of its "
                    f"{len(saved)} rows; restored them from '{ckpts[0].name}'")
    return True


def cell_progress(cell_dir: Path) -> dict[str, Any]:
    """Where a cell stands, for reports: its status, whether a live runner holds it now (a "running" status
    without one means its runner died: a rerun resumes it), its last metrics row, the newest checkpoint a rerun
    would resume from, checkpoints set aside as corrupt, and the recorded error or interruption."""
    cell_dir = Path(cell_dir)
    status = read_status(cell_dir)
    rows = read_metrics(cell_dir)
    ckpts = checkpoint_paths(cell_dir)
    return {"status": status.get("status", "pending"),
            "live": CellLock(cell_dir / LOCK_FILE).holder() is not None,
            "last_iteration": int(rows[-1]["iteration"]) if rows else None,
            "resumes_from": checkpoint_iteration(ckpts[0]) if ckpts else None,
            "corrupt": sorted(p.name for p in cell_dir.glob("*" + CORRUPT_SUFFIX)),
            "error": status.get("error")}
