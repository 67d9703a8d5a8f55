"""The pieces every module shares: errors, registries, typed options, the policy interface, the compute meter, model families."""
