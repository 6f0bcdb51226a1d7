"""Trace generators and the trace-driven simulator of dynamic expert rebalancing.

Nothing heavy is imported here: import the submodule you need (``eplb.sim.traces``, ``eplb.sim.simulator``,
``eplb.dispatch``, ``eplb.sim.cost``).
"""
