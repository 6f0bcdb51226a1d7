"""A small expert-parallel MoE engine driven by the runtime (:mod:`eplb.runtime`): the integration example.

- :mod:`eplb.engine.model`: the model and its expert-parallel forward (route -> all_to_all -> experts -> combine).
- :mod:`eplb.engine.tokens`: the skewed workload.
- :mod:`eplb.engine.serve`: one rank's serving loop with the controller's hooks (what an engine does every step).
- :mod:`eplb.engine.launch`: spawns the ranks of a Gloo (or NCCL) group on this machine.

``eplb demo`` runs it end to end.
"""
