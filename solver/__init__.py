"""Placement problem: model + fleet description, cost model, ILP, exact fast solver, baselines.

Plain data in, plan out; imports nothing from controller/agent.

    from solver.fast import solve
    plan = solve(Problem(model, fleet, workload, options))

The package itself imports nothing, so that the agent may use solver.memory and
solver.ggml_types without loading the solver stack (PuLP, HiGHS).
"""
