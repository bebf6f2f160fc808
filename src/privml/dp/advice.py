"""Warnings about private settings that cannot learn, given before training starts.

Client-level DP (DP-FedAvg) adds Gaussian noise of standard deviation ``z * C`` to the sum of
the sampled clients' updates, each clipped to L2 norm ``C``, and divides by the expected number
of clients ``m``. Over ``d`` parameters the noise on the mean update has norm about
``z * C * sqrt(d) / m``, while the mean of the clipped updates has norm at most ``C``: the
ratio ``z * sqrt(d) / m`` does not depend on ``C``. Above 1, every round's noise is larger than
anything the clients could have agreed on, and with a handful of sites the model stays at chance
(3 hospitals at epsilon 1 and 8 gave a chance-level AUC). The noise multiplier ``z`` is fixed
by epsilon, delta, the rounds and the sampling rate, so the fix is more clients per round
(about ``z * sqrt(d)``), a smaller model, fewer rounds, or sample-level DP.
"""

from __future__ import annotations

import math

__all__ = ["client_level_noise_ratio", "client_level_warning"]


def client_level_noise_ratio(noise_multiplier: float, n_params: int, clients: float) -> float:
    """Expected norm of the noise on the mean update, relative to the clip bound."""
    return noise_multiplier * math.sqrt(n_params) / max(clients, 1e-12)


def client_level_warning(
    *, noise_multiplier: float, n_params: int, clients: float, n_sites: int, epsilon: float
) -> str | None:
    """The warning for a DP-FedAvg setting whose per-round noise exceeds the clipped update, or
    None when the noise is at most the update's norm."""
    ratio = client_level_noise_ratio(noise_multiplier, n_params, clients)
    if ratio <= 1.0:
        return None
    need = math.ceil(noise_multiplier * math.sqrt(n_params))
    return (
        f"client-level DP with {clients:g} site(s) per round: the noise added to the mean "
        f"update (noise multiplier {noise_multiplier:.3g}, {n_params} parameters) has about "
        f"{ratio:.1f}x the norm of the largest clipped update: each round moves the model mostly "
        f"by noise, and on hard data it may stay at chance. At epsilon {epsilon:.3g} this "
        f"setting needs roughly {need} sites per round "
        f"(it has {n_sites}); otherwise use privacy.mode = \"sample\" (each site's records), "
        "a smaller model, fewer rounds or a larger epsilon."
    )
