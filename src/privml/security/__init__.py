"""Security audit: attacks against privml's own models and the defences whose effect is measured.

* :mod:`privml.security.attacks` -- evasion (FGSM, PGD), membership inference (loss threshold,
  LiRA), gradient inversion, federated backdoors and poisoning; each returns a measured
  success metric.
* :mod:`privml.security.defenses` -- adversarial training, and the server defences the audit
  measures (anomaly filter, norm clipping, robust rule, weak DP), run as stages of the round
  engine (their pieces live in :mod:`privml.fl.anomaly` and :mod:`privml.fl.aggregate`).
* :mod:`privml.security.audit` -- ``privml audit`` and the quick audit every run reports.
"""
