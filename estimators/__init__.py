"""Likelihood estimators over a Rollout (DESIGN section 6); each file registers one."""
from bench.core.registry import Registry

ESTIMATORS: Registry = Registry("estimator", "estimators")
