"""Per-cell lock files, so several runners (or Slurm jobs) on one results folder never run a cell twice.

A lock is a small JSON file created with O_CREAT|O_EXCL (atomic on local filesystems and NFSv3+), holding who
owns it. The owner touches it every `heartbeat_s` seconds. Nobody releases a lock for a dead owner, so a reader
decides staleness from the content:

- same host (and same boot): stale when the pid is gone, is a zombie, or now belongs to another process;
- same Slurm job, later restart (a requeue after preemption): stale, the new incarnation takes its cell back;
- another host: stale when the heartbeat is older than `stale_after_s` (its pid cannot be checked from here).

Breaking a stale lock goes through a second O_EXCL file (`<lock>.break`), so two runners that both judged a lock
stale cannot each delete the other's fresh lock.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# A lock file that is still empty this long after creation was left by an owner killed between create and write.
_EMPTY_LOCK_GRACE_S = 10.0
# Breaking takes microseconds; a .break file older than this was left by a breaker that died mid-break.
_BREAKER_GRACE_S = 30.0


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a Linux process, or None if unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces and parentheses
    return fields[0], int(fields[19])


def _slurm_job() -> tuple[str | None, int]:
    """(job id, restart count): the id survives a requeue, the restart count grows with each one."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_PROCID", "0") != "0":
        job = f"{job}.{os.environ['SLURM_PROCID']}"
    return job, int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


@dataclass
class LockOwner:
    """Who holds a lock; written as the lock file's JSON content."""

    token: str
    pid: int
    host: str
    boot_id: str | None
    proc_start: int | None
    job_id: str | None
    job_restarts: int
    started: float

    @classmethod
    def me(cls) -> LockOwner:
        stat = proc_stat(os.getpid())
        job, restarts = _slurm_job()
        return cls(uuid.uuid4().hex, os.getpid(), socket.gethostname(), _boot_id(), stat[1] if stat else None,
                   job, restarts, time.time())

    def describe(self) -> str:
        job = f", Slurm job {self.job_id}" if self.job_id else ""
        return f"pid {self.pid} on {self.host}{job}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}"


def read_owner(path: Path) -> tuple[LockOwner | None, str | None]:
    """(owner, raw text) of a lock file; (None, None) if there is none, (None, raw) if it is empty or torn."""
    try:
        raw = Path(path).read_text()
    except FileNotFoundError:
        return None, None
    try:
        return LockOwner(**json.loads(raw)), raw
    except (json.JSONDecodeError, TypeError):
        return None, raw


def stale_reason(path: Path, owner: LockOwner | None, stale_after_s: float) -> str | None:
    """Why the lock at `path` (held by `owner`) is stale, or None if its owner may still be running."""
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return "lock file vanished"
    if owner is None:
        return f"empty lock file, {age:.0f} s old" if age > _EMPTY_LOCK_GRACE_S else None
    me = LockOwner.me()
    if owner.job_id is not None and owner.job_id == me.job_id and owner.job_restarts < me.job_restarts:
        return f"Slurm job {owner.job_id} was requeued (restart {owner.job_restarts} -> {me.job_restarts})"
    if owner.host == me.host:
        if owner.boot_id and me.boot_id and owner.boot_id != me.boot_id:
            return f"{owner.host} rebooted since pid {owner.pid} took the lock"
        try:
            os.kill(owner.pid, 0)
        except ProcessLookupError:
            return f"pid {owner.pid} on {owner.host} is not running"
        except PermissionError:
            pass  # alive, owned by another user
        stat = proc_stat(owner.pid)
        if stat is not None:
            state, start = stat
            if state in ("Z", "X"):  # killed but not yet reaped by its parent: it will never write again
                return f"pid {owner.pid} on {owner.host} is dead (zombie)"
            if owner.proc_start is not None and start != owner.proc_start:
                return f"pid {owner.pid} on {owner.host} now belongs to another process"
        return None
    if age > stale_after_s:
        return f"no heartbeat from {owner.host} for {age:.0f} s (> {stale_after_s:.0f} s)"
    return None


def _break(path: Path, seen_raw: str | None) -> None:
    """Delete the lock at `path` only if it still holds `seen_raw` (the content judged stale)."""
    breaker = path.with_name(path.name + ".break")
    try:
        os.close(os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        try:
            if time.time() - os.stat(breaker).st_mtime > _BREAKER_GRACE_S:
                breaker.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        return
    try:
        _, raw = read_owner(path)
        if raw == seen_raw:
            path.unlink(missing_ok=True)
    finally:
        breaker.unlink(missing_ok=True)


class CellLock:
    """An exclusive, crash-tolerant lock on one cell folder (see the module docstring)."""

    def __init__(self, path: Path, heartbeat_s: float = 30.0, stale_after_s: float = 600.0):
        self.path = Path(path)
        self.heartbeat_s, self.stale_after_s = float(heartbeat_s), float(stale_after_s)
        self.owner: LockOwner | None = None
        self.broke: str | None = None       # why a stale lock was taken over, if one was
        self.lost = False                   # another runner broke this lock while we held it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> LockOwner | None:
        """The live owner of this lock, or None if it is free or stale."""
        owner, raw = read_owner(self.path)
        if raw is None or stale_reason(self.path, owner, self.stale_after_s) is not None:
            return None
        return owner

    def acquire(self) -> bool:
        """Take the lock (breaking a stale one); False if a live owner holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner, raw = read_owner(self.path)
                if raw is None:
                    continue  # released between our open and read
                reason = stale_reason(self.path, owner, self.stale_after_s)
                if reason is None:
                    return False
                self.broke = f"{reason} ({owner.describe() if owner else 'unknown owner'})"
                _break(self.path, raw)
                continue
            me = LockOwner.me()
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(asdict(me)))
                f.flush()
                os.fsync(f.fileno())
            self.owner, self.lost = me, False
            self._stop.clear()
            self._thread = threading.Thread(target=self._heartbeat, name=f"lock-heartbeat {self.path}", daemon=True)
            self._thread.start()
            return True
        return False

    def owns(self) -> bool:
        owner, _ = read_owner(self.path)
        return self.owner is not None and owner is not None and owner.token == self.owner.token

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.owns():
                self.lost = True
                print(f"warning: lost the lock {self.path}: another runner judged it stale and took the cell",
                      flush=True)
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self.lost = True
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.owns():
            self.path.unlink(missing_ok=True)
        self.owner = None

    def __enter__(self) -> CellLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
