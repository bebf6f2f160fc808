"""The stages of a federated round, one mechanism per module.

Each stage takes part in one or more steps of :func:`privml.fl.rounds.run_rounds` and says so
in its ``step`` attribute; which stages a run uses is decided by :mod:`privml.fl.plan`, and
which combinations run at all by :mod:`privml.fl.compat`.

=====================  =================  =========================================
module                 step               stages
=====================  =================  =========================================
``cohort``             cohort             uniform sampling, Poisson sampling
``local``              local update       SGD, FedProx (any gradient rule: DP-SGD)
``attack``             site               simulated attackers (update, data, backdoor)
``clip``               site               clip each update to an L2 bound
``secure``             seal, combine      Paillier / CKKS secure aggregation
``aggregate``          combine            validation, anomaly filter, robust rules
``optimizer``          optimize           the server optimizer
``checkpoint``         record             authenticated checkpoints
=====================  =================  =========================================
"""
