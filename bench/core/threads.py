"""One CPU thread budget for every thread pool a cell uses: torch's intra-op pool, the BLAS libraries numpy and
scikit-learn call (OpenBLAS, MKL) and OpenMP runtimes.

Why all of them: the digits judge (scikit-learn) scores a few hundred rows per iteration through numpy's BLAS;
from 256 rows up OpenBLAS wakes its second thread, which then spin-waits after the call and slows the next torch
forwards 2-3x on a 2-core machine (issue 12: a tree iteration at 2 torch threads took 48 ms, 21 ms with
OPENBLAS_NUM_THREADS=1). Capping torch alone leaves that pool at the core count. The BLAS pools (numpy's and
scipy's OpenBLAS; torch links its own BLAS, which follows torch's threads) get one thread whatever the budget:
they serve only the reward judges' small matrices between torch calls, where a second thread only spins.
"""
from __future__ import annotations

import os

import torch
from threadpoolctl import threadpool_limits

ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
BLAS_THREADS = 1
_cap: int | None = None


def cap_threads(n: int) -> None:
    """Limit torch and the OpenMP pools to `n` threads and the BLAS pools to BLAS_THREADS, those loaded so far and
    (through the environment) those loaded later."""
    global _cap
    n = int(n)
    for var in ENV_VARS:  # read by libraries loaded from now on (and by spawned workers)
        os.environ[var] = str(BLAS_THREADS if var == "OPENBLAS_NUM_THREADS" else n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    threadpool_limits(limits={"openmp": n, "blas": min(n, BLAS_THREADS)})
    _cap = n


def reapply() -> None:
    """Cap again the pools of libraries loaded since the last cap_threads (scikit-learn's OpenMP on first use)."""
    if _cap is not None:
        cap_threads(_cap)


def current_cap() -> int | None:
    """The last cap set in this process, or None."""
    return _cap
