"""Child processes that die with the process that started them, so a runner killed with SIGKILL (which it cannot
catch or forward) leaves no worker behind to go on taking queued cells or writing into a grid nobody watches.

Two mechanisms, because each has a gap: Linux's PR_SET_PDEATHSIG has the kernel send the child SIGKILL the moment
its parent dies (it fires on the death of the parent *thread* that forked it: callers start children from a
thread that lives as long as the process); a watcher thread polling getppid() covers other systems and a parent
that died before the child could ask. A killed child loses at most the work since its last checkpoint: every file
the bench writes is written atomically (bench/runner/store.py).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Any

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
POLL_S = 0.5
ENV = "BENCH_DIE_WITH"  # the pid a child of the bench should die with
_watched: int | None = None  # the parent this process already dies with


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _libc_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up once here: a Popen preexec_fn runs between fork and exec, where loading a library could deadlock.
_PRCTL = _libc_prctl()


def _set_pdeathsig() -> bool:
    return _PRCTL is not None and _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0


def _watch(parent: int, poll_s: float) -> None:
    while True:
        if os.getppid() != parent:  # reparented: the parent is gone
            _kill_self()
        threading.Event().wait(poll_s)


def die_with_parent(parent: int | None = None, poll_s: float = POLL_S) -> None:
    """Make this process die (SIGKILL) as soon as `parent` (default: its current parent) does."""
    global _watched
    parent = os.getppid() if parent is None else parent
    if _watched == parent:
        return
    _set_pdeathsig()
    if os.getppid() != parent:  # the parent died before the line above took effect
        _kill_self()
    threading.Thread(target=_watch, args=(parent, poll_s), name="lifeline", daemon=True).start()
    _watched = parent


def _watch_pid(pid: int, parent: int, poll_s: float) -> None:
    while True:
        if not _alive(pid) or os.getppid() != parent:
            _kill_self()
        threading.Event().wait(poll_s)


def die_with(pid: int, poll_s: float = POLL_S) -> None:
    """Make this process die (SIGKILL) as soon as its parent or process `pid` (an ancestor further up: the runner
    of a worker forked by a fork server) does: PR_SET_PDEATHSIG covers the parent, a watcher thread `pid`."""
    global _watched
    if pid == os.getppid():
        die_with_parent(pid, poll_s)
        return
    parent = os.getppid()
    _set_pdeathsig()
    if os.getppid() != parent or not _alive(pid):  # either died before the line above took effect
        _kill_self()
    threading.Thread(target=_watch_pid, args=(pid, parent, poll_s), name="lifeline", daemon=True).start()
    _watched = pid


def hold_on_children(env: dict[str, str] | None = None) -> None:
    """Ask the processes this one starts to die with it from their first `import bench` on (see join()): a worker
    spends seconds importing torch before any code of ours runs, and a runner killed then would leave it."""
    (os.environ if env is None else env)[ENV] = str(os.getpid())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def join() -> None:
    """Die with the process that asked (hold_on_children), before anything heavy is imported; run by bench's
    __init__. A child whose asker is already gone (killed while the child was starting) dies at once; the ask is
    not passed on (this process's own children get their own)."""
    asked = os.environ.pop(ENV, None)
    if not asked or not asked.isdigit():
        return
    if int(asked) == os.getppid():
        die_with_parent(int(asked))
    elif not _alive(int(asked)):
        _kill_self()


def preexec_die_with_parent() -> None:
    """For subprocess.Popen(preexec_fn=...): the child gets SIGKILL when the process that started it dies."""
    _set_pdeathsig()
