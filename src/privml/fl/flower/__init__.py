"""The Flower engine: privml's federated training across real machines on Flower 1.42.

The coordinator runs a Flower SuperLink and submits runs; each site runs a SuperNode with its
own data. The ServerApp (:mod:`.server_app`) and ClientApp (:mod:`.client_app`) use Flower's
message API and call the same code as the simulation: the engine's site-side training
(:func:`privml.fl.engine.local_updates`), update validation (:mod:`privml.fl.validate`) and the
pure aggregation functions (:mod:`privml.fl.aggregate`).

Modules: :mod:`.certs` (test CA, server certificate, SuperNode keys), :mod:`.env` (offline
settings for Flower processes), :mod:`.protocol`, :mod:`.evaluation`, :mod:`.site`,
:mod:`.node` (privml's fast SuperNode), :mod:`.run` (``privml flower run``),
:mod:`.processes`, :mod:`.cli` (the ``privml flower`` commands).

Importing this package does not import ``flwr`` (it is imported by the modules that need it).
"""

from privml.fl.flower.certs import DeploymentKeys, generate_certificates

__all__ = ["DeploymentKeys", "generate_certificates"]
