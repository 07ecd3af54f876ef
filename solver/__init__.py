"""Placement problem: model + fleet description, cost model, ILP, exact fast solver, baselines.

Plain data in, plan out; imports nothing from controller/agent.

    from solver import solve
    plan = solve(Problem(model, fleet, workload, options))
"""


def solve(problem):
    """The best plan for a problem (solver/fast.py: proven optimal or with its gap)."""
    from solver.fast import solve_fast

    return solve_fast(problem)
