"""Policy-gradient objectives and advantage schemes (DESIGN sections 7-8); each file registers its own."""
from bench.core.registry import Registry

OBJECTIVES: Registry = Registry("objective", "objectives")
ADVANTAGES: Registry = Registry("advantage", "objectives")
