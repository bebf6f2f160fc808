"""Security audit: attacks against privml's own models and the defences whose effect is measured.

* :mod:`privml.security.attacks` -- evasion (FGSM, PGD), membership inference (loss threshold,
  LiRA), gradient inversion, federated backdoors and poisoning; each returns a measured
  success metric.
* :mod:`privml.security.defenses` -- adversarial training, norm clipping with weak DP, update
  anomaly detection (robust aggregation itself lives in
  :mod:`privml.fl.aggregate`).
* :mod:`privml.security.audit` -- ``privml audit`` and the quick audit every run reports.
"""
