"""The options of each launcher (bench/runner/launchers.py), apart from it so that config checks need not import the
launching machinery."""
from __future__ import annotations

from bench.core.schema import Option

_POLL = Option(10.0, float, low=0, low_open=True, help="seconds between checks on cells another runner holds")
_NULL_STR = Option(None, str, nullable=True)
LAUNCHER_OPTIONS = {
    "local": {"poll_s": _POLL},
    "parallel": {"workers": Option(2, int, low=1, nullable=True, help="worker processes; null: one per core"),
                 "threads_per_worker": Option(None, int, low=1, nullable=True, help="null: cores // workers"),
                 "poll_s": _POLL},
    # hydra-submitit-launcher's SlurmQueueConf keys
    "slurm": {
        "cluster": Option("slurm", str, choices=("slurm", "local"),
                          help="local: submitit's local executor (jobs as processes here; for tests)"),
        "submitit_folder": Option(None, str, nullable=True, help="job scripts and logs; null: <grid>/.submitit/%j"),
        "partition": _NULL_STR, "qos": _NULL_STR, "account": _NULL_STR, "constraint": _NULL_STR,
        "comment": _NULL_STR, "exclude": _NULL_STR,
        "timeout_min": Option(240, int, low=1, help="per job; a longer cell is requeued and resumes"),
        "cpus_per_task": Option(8, int, low=1),
        "gpus_per_node": Option(1, int, low=0, help="devices per cell; several: the cell trains data-parallel"),
        "processes_per_cell": Option(None, int, low=1, nullable=True, help="ranks per cell; null: one per GPU"),
        "tasks_per_node": Option(1, int, low=1, help="one task per cell job (it starts the ranks itself)"),
        "nodes": Option(1, int, low=1, high=1, help="a cell runs on one node"),
        "mem_gb": Option(None, float, low=0, low_open=True, nullable=True),
        "signal_delay_s": Option(120, int, low=0, help="Slurm signals the job this long before its limit"),
        "max_num_timeout": Option(20, int, low=0, help="requeues after a timeout (preemptions do not count)"),
        "array_parallelism": Option(64, int, low=1, help="at most this many cells at once"),
        "stderr_to_stdout": Option(False, bool),
        "additional_parameters": Option({}, dict, help="any other sbatch option, e.g. {mail-type: END}"),
        "setup": Option([], list, item=Option("", str), help="shell lines run before the job (module load ...)"),
        "job_name": Option(None, str, nullable=True, help="null: bench-<grid>"),
        "poll_s": Option(60.0, float, low=0, low_open=True, help="seconds between checks on cells other runners hold"),
    },
}
