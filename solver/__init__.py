"""Placement problem: model + fleet description, cost model, ILP, exact fast solver, baselines."""
