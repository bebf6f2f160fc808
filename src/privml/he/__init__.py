"""Homomorphic encryption: CKKS (TenSEAL/SEAL) and Paillier (phe) behind one interface.

* Keys: :func:`keygen` at the party that decrypts; ``keys.public.to_bytes()`` is safe to send,
  ``keys.secret.save(path, passphrase=...)`` writes the secret key encrypted, mode 0600.
* Encrypted inference: :func:`compile_model` turns a trained privml model into an evaluator
  (logistic regression on both schemes, a polynomial-activation MLP on CKKS);
  :func:`encrypt_features` / ``evaluator.predict`` / :func:`decrypt_scores`. Answers carry only
  the scores (masked, re-randomized, flooded: :mod:`privml.he.protect`); ``evaluator.make_pool``
  precomputes that protection per key.
* Encrypted aggregation for federated rounds: :class:`SecureAggregator`.
* :func:`run_encrypted_inference_check`: the figures ``privml run`` reports.

Security model and what each party learns: docs/threat-model.md.
"""

try:
    from privml.he._seal import HE_STANDARD_128
    from privml.he.aggregation import SecureAggregator
    from privml.he.api import (
        KeyPair,
        decrypt_scores,
        encrypt_features,
        keygen,
        load_features,
        load_public,
        load_scores,
        load_secret,
    )
    from privml.he.check import run_encrypted_inference_check
    from privml.he.ckks import CKKSCiphertexts, CKKSProfile, CKKSPublicContext, CKKSSecretKey
    from privml.he.evaluators import (
        CKKSLinearEvaluator,
        CKKSMLPEvaluator,
        EvaluationTimeout,
        PaillierLinearEvaluator,
        charged_patients,
        compile_model,
    )
    from privml.he.paillier import (
        PaillierCiphertexts,
        PaillierPublicKey,
        PaillierRandomnessPool,
        PaillierSecretKey,
    )
    from privml.he.protect import CKKSAnswerPool
    from privml.he.requirements import EvaluatorRequirements
except ImportError:  # the 'he' extra is missing: say so, and how to install it
    from privml.extras import require

    require("he", "Homomorphic encryption (privml.he)")
    raise

__all__ = [
    "HE_STANDARD_128",
    "CKKSAnswerPool",
    "CKKSCiphertexts",
    "CKKSLinearEvaluator",
    "CKKSMLPEvaluator",
    "CKKSProfile",
    "CKKSPublicContext",
    "CKKSSecretKey",
    "EvaluationTimeout",
    "EvaluatorRequirements",
    "KeyPair",
    "PaillierCiphertexts",
    "PaillierLinearEvaluator",
    "PaillierPublicKey",
    "PaillierRandomnessPool",
    "PaillierSecretKey",
    "SecureAggregator",
    "charged_patients",
    "compile_model",
    "decrypt_scores",
    "encrypt_features",
    "keygen",
    "load_features",
    "load_public",
    "load_scores",
    "load_secret",
    "run_encrypted_inference_check",
]
