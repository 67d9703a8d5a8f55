"""Child processes that die with the process that started them, so a runner killed with SIGKILL (which it cannot
catch or forward) leaves no worker behind to go on taking queued cells or writing into a grid nobody watches.

Two mechanisms, because each has a gap: Linux's PR_SET_PDEATHSIG has the kernel send the child SIGKILL the moment
its parent dies (it fires on the death of the parent *thread* that forked it: callers start children from a
thread that lives as long as the process); a watcher thread polling getppid() covers other systems and a parent
that died before the child could ask. A killed child loses at most the work since its last checkpoint: every file
the bench writes is written atomically (bench/store.py).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
POLL_S = 0.5


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _set_pdeathsig() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int, poll_s: float) -> None:
    while True:
        if os.getppid() != parent:  # reparented: the parent is gone
            _kill_self()
        threading.Event().wait(poll_s)


def die_with_parent(parent: int | None = None, poll_s: float = POLL_S) -> None:
    """Make this process die (SIGKILL) as soon as `parent` (default: its current parent) does."""
    parent = os.getppid() if parent is None else parent
    _set_pdeathsig()
    if os.getppid() != parent:  # the parent died before the line above took effect
        _kill_self()
    threading.Thread(target=_watch, args=(parent, poll_s), name="lifeline", daemon=True).start()


def preexec_die_with_parent() -> None:
    """For subprocess.Popen(preexec_fn=...): the child gets SIGKILL when the process that started it dies."""
    _set_pdeathsig()
