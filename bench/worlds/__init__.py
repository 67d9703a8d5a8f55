"""Worlds: a policy model + prompt set + rewards + eval protocol (DESIGN section 11)."""
from bench.core.registry import Registry

WORLDS: Registry = Registry("world", "bench.worlds")
