"""diffrl-bench: the design space of RL post-training for diffusion and flow models."""

from bench.runner import lifeline

__version__ = "0.1.0"

lifeline.join()  # a worker of a runner dies with it from here on (bench/runner/lifeline.py)
