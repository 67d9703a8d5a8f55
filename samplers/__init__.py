"""Rollout schemes: each file registers one sampler that produces a Rollout (DESIGN section 5)."""
from bench.core.registry import Registry

SAMPLERS: Registry = Registry("sampler", "samplers")
