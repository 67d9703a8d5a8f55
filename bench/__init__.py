"""diffrl-bench: the design space of RL post-training for diffusion and flow models."""

__version__ = "0.1.0"
