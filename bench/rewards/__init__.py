"""Reward functions: images in [0, 1] and prompts in, one score per image out."""
from bench.core.registry import Registry

REWARDS: Registry = Registry("reward", "bench.rewards")
