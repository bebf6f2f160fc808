"""Which mechanisms combine: the one compatibility table.

Every combination of a run's mechanisms either runs or is refused here, with the reason and,
where one exists, what to do instead. The config loader checks every config against
:data:`TABLE` (:func:`check_combination`; a refusal is a :class:`~privml.errors.ConfigError`,
exit code 2, before any data is read or any budget spent), and docs/architecture.md's table is
generated from it (:func:`table_markdown`). Nothing else in privml refuses a combination.

A row names, for some of the *options* of a run (:func:`options`), the values it applies to;
a run matches the row when each named option takes one of the listed values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from privml.errors import ConfigError

__all__ = ["OPTIONS", "TABLE", "Combination", "check_combination", "options", "refusals",
           "table_markdown"]  # fmt: skip

ROBUST_RULES: tuple[str, ...] = (
    "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "fltrust", "centered_clip"
)  # fmt: skip
"""Aggregation rules that compare individual updates (all but fedavg and norm_bound)."""

OPTIONS: dict[str, str] = {
    "engine": "[training] engine: simulation | flower",
    "privacy": "[privacy] mode: none | sample | client",
    "secure_aggregation": "[training] secure_aggregation: none | paillier | ckks | secagg+",
    "aggregator": "[training] aggregator",
    "attack": "[attack] kind, or none",
    "features": "[model] features: none | hog",
    "adaptive_clip": "[privacy] adaptive_clip: on | off",
    "accountant": "[privacy] accountant: pld | rdp",
    "resume": "privml run --resume: yes | no",
    "secure_checks": "[training] secure_aggregation_checks: none | norm | norm+cosine",
    "secagg_modulus": "[training] secagg_modulus: 2**32 or below | above 2**32",
    "secagg_consistency": "[training] secagg_colluding_sites, secagg_min_senders: default | set",
}
"""The options a row may name, and where each comes from."""


@dataclass(frozen=True)
class Combination:
    """One row: when every option in ``when`` takes one of its values, the run ``runs`` (and
    ``how`` says by which stages) or is refused for ``reason`` (``instead``: the alternative)."""

    when: Mapping[str, tuple[str, ...]]
    runs: bool
    reason: str
    instead: str | None = None
    how: str | None = None
    at_run: bool = False
    """Checked when a run starts (before any data is read), not when the config loads: the
    combination is fine in a config that a command uses otherwise (``privml audit`` trains
    the model without ``[attack]`` and simulates the attackers itself)."""

    def matches(self, opts: Mapping[str, str]) -> bool:
        return all(opts.get(k) in v for k, v in self.when.items())

    def label(self) -> str:
        return " + ".join(
            f"{k} {'/'.join(v)}" if len(v) < 4 else f"{k} ({', '.join(v)})"
            for k, v in self.when.items()
        )


_SECURE = ("paillier", "ckks")
_DP = ("sample", "client")

TABLE: tuple[Combination, ...] = (
    # ---- refused ---------------------------------------------------------------------------
    Combination(
        {"secure_aggregation": _SECURE, "aggregator": ROBUST_RULES},
        False,
        "the server sees only the encrypted sum, never the individual updates a robust rule "
        "compares",
        'aggregator = "fedavg", or "norm_bound" with a fixed max_norm (each site clips before '
        "encrypting)",
    ),
    Combination(
        {"privacy": ("client",), "aggregator": ROBUST_RULES},
        False,
        "client-level DP calibrates its noise to the sum of clipped updates, which one client "
        "moves by at most clip; under Poisson client sampling a rule that ranks or selects "
        "updates can move by up to clip * sqrt(n_params) when one client joins, so the noise "
        "would not cover it",
        'aggregator = "fedavg" or "norm_bound": DP-FedAvg clips every update, which bounds what '
        "any client (an attacker too) moves a round by to clip / (expected clients)",
    ),
    Combination(
        {"privacy": ("sample",), "aggregator": ("fltrust",)},
        False,
        "FLTrust trains the server on root records carved from a site without DP",
        'another robust rule ("median", "trimmed_mean", "krum", ...)',
    ),
    Combination(
        {"privacy": ("client",), "adaptive_clip": ("on",), "secure_aggregation": _SECURE},
        False,
        "adaptive clipping releases a noisy count of unclipped updates each round, which the "
        "encrypted sum does not carry",
        "adaptive_clip = false (a fixed clip)",
    ),
    Combination(
        {"engine": ("flower",), "attack": ("alie", "ipm")},
        False,
        "an omniscient attacker reads the other sites' honest updates, which no site of a "
        "deployment sees",
        'engine = "simulation", or a per-site attack (sign_flip, scale, gaussian, label_flip)',
    ),
    Combination(
        {"engine": ("flower",), "attack": ("backdoor",)},
        False,
        "model replacement scales the attacker's update by the cohort's total weight, which a "
        "site of a deployment does not know",
        'engine = "simulation" (privml run), or privml audit',
    ),
    Combination(
        {"engine": ("flower",), "aggregator": ("fltrust",)},
        False,
        "FLTrust needs a root dataset at the server, which the Flower coordinator does not hold",
        "another robust rule",
    ),
    Combination(
        {"engine": ("flower",), "features": ("hog",)},
        False,
        "the feature map's centre is computed across sites before training, an exchange the "
        "Flower engine does not carry",
        'engine = "simulation", or features = "none"',
    ),
    Combination(
        {"secure_aggregation": ("secagg+",), "aggregator": ROBUST_RULES},
        False,
        "under masking the server sees only the masked sum, never the individual updates a "
        "robust rule compares",
        'aggregator = "fedavg", or "norm_bound" with a fixed max_norm (each site clips before '
        "masking; the server checks the unmasked sum's norm)",
    ),
    Combination(
        {"secure_aggregation": ("secagg+",), "engine": ("flower",), "privacy": ("client",)},
        False,
        "distributed DP adds each site's integer noise share after quantization, with "
        "conditional rounding; on Flower the site's update goes to Flower's secaggplus_mod, "
        "which weights, quantizes and masks it in one step, with its own rounding",
        'engine = "simulation" (privml\'s own SecAgg+ protocol), or secure_aggregation = '
        '"paillier" / "ckks" on Flower',
    ),
    Combination(
        {
            "secure_aggregation": ("secagg+",),
            "engine": ("flower",),
            "secagg_modulus": ("above 2**32",),
        },
        False,
        "Flower's workflow draws its masks as NumPy int64 values below the modulus and adds "
        "the sites' vectors in int64, which overflows above 2**32",
        "secagg_modulus = 2**32 or below (the default is 2**32)",
    ),
    Combination(
        {
            "secure_aggregation": ("secagg+",),
            "engine": ("flower",),
            "secagg_consistency": ("set",),
        },
        False,
        "they configure the consistency check of privml's own SecAgg+ protocol; Flower's "
        "SecAggPlusWorkflow has no consistency check (on Flower, SecAgg+ protects against a "
        "semi-honest server only)",
        'engine = "simulation", or remove secagg_colluding_sites and secagg_min_senders',
    ),
    Combination(
        {"secure_aggregation": ("secagg+",), "privacy": ("client",), "adaptive_clip": ("on",)},
        False,
        "adaptive clipping releases a noisy count of unclipped updates each round, which the "
        "masked sum does not carry",
        "adaptive_clip = false (a fixed clip)",
    ),
    Combination(
        {"secure_aggregation": ("secagg+",), "privacy": ("client",), "features": ("hog",)},
        False,
        "the feature map's private centre is a noised sum the server would compute from the "
        "sites' plain means, outside the masking",
        'features = "none", or secure_aggregation = "none"',
    ),
    Combination(
        {
            "secure_checks": ("norm", "norm+cosine"),
            "secure_aggregation": ("none", "paillier", "secagg+"),
        },
        False,
        "the encrypted norm check computes each update's norm on CKKS ciphertexts (Paillier "
        "cannot multiply two ciphertexts; masking hides nothing the server could compute on)",
        'secure_aggregation = "ckks"',
    ),
    Combination(
        {"secure_checks": ("norm", "norm+cosine"), "privacy": _DP},
        False,
        "the encrypted norm check scales updates by factors computed from their norms, which "
        "the privacy accounting of private training does not cover yet",
        'secure_aggregation_checks = "none" (client-level DP clips every update itself)',
    ),
    Combination(
        {"secure_checks": ("norm", "norm+cosine"), "engine": ("flower",)},
        False,
        "the norm requests to the key holder are not yet carried over Flower messages",
        'engine = "simulation"',
    ),
    Combination(
        {"privacy": _DP, "accountant": ("rdp",)},
        False,
        "the published site sizes make replace-one the neighbouring relation, which "
        "dp-accounting's RDP accountant does not support for Poisson sampling",
        'accountant = "pld" (the default)',
    ),
    # ---- runs (the combinations a deployment needs; tested end to end) ----------------------
    Combination(
        {"privacy": ("sample",), "secure_aggregation": _SECURE},
        True,
        "each site trains with DP-SGD and books its cost, then clips, weights and encrypts its "
        "update; the server sums ciphertexts",
        how="DP-SGD -> accounting -> seal -> secure sum",
    ),
    Combination(
        {"privacy": ("client",), "secure_aggregation": _SECURE},
        True,
        "each site clips its update and adds its share of the Gaussian noise before encrypting, "
        "so the server and the key holder only ever see a noised sum; a round with a share "
        "missing is skipped, never decrypted",
        how="clip -> noise share -> seal -> secure sum (fixed denominator)",
    ),
    Combination(
        {"privacy": ("sample",), "aggregator": ROBUST_RULES[:5] + ("centered_clip",),
         "attack": ("sign_flip", "scale", "gaussian", "label_flip", "alie", "ipm", "backdoor")},
        True,
        "DP-SGD at every site (attackers included), the attack on the attackers' updates, the "
        "robust rule on the server; an honest site's guarantee does not depend on what the "
        "others send",
        how="DP-SGD -> attack -> accounting -> checks and robust rule",
    ),
    Combination(
        {"privacy": _DP, "resume": ("yes",)},
        True,
        "the checkpoint carries what each site has booked (and the private input centre); a "
        "round computed again after a crash is booked again, since its first release may have "
        "left the site",
        how="checkpoint (stage states) -> resume -> accounting continues",
    ),
    Combination(
        {"privacy": ("client",), "aggregator": ("fedavg", "norm_bound")},
        True,
        "DP-FedAvg: validation, every update clipped to clip (and to norm_bound's max_norm), "
        "summed, noised; the clip bounds what any client, an attacker too, moves a round by",
        how="checks -> clip -> central noise -> optimizer",
    ),
    Combination(
        {"engine": ("flower",), "privacy": ("sample",)},
        True,
        "each site plans its DP-SGD from its own config, checks the plan against its own "
        "ledger's budget, trains with noise from its own source and books each round in its "
        "own ledger before its update leaves; it refuses a round it cannot afford (the server "
        "cannot spend a site's budget; its view of the budgets is what the sites report)",
        how="private setup at each site (plan, budget check, private input mean booked) -> "
        "centre -> DP-SGD -> attack -> accounting (site's ledger) -> seal -> combine -> "
        "optimizer",
    ),
    Combination(
        {"engine": ("flower",), "privacy": ("client",)},
        True,
        "each site books the whole run's client-level epsilon in its own ledger before its "
        "first update leaves and answers each round once; the server samples the clients, "
        "clips and adds the central noise, or, under secure aggregation, each site clips and "
        "adds its noise share before encrypting",
        how="private setup at each site (budget check, booking) -> Poisson cohort -> local "
        "update -> checks -> clip -> central noise -> optimizer; or clip -> noise share -> "
        "seal -> secure sum",
    ),
    Combination(
        {"engine": ("flower",), "secure_aggregation": _SECURE},
        True,
        "the key holder site makes the keys and decrypts only sums, over Flower messages",
        how="setup (keygen at the key holder) -> seal at sites -> sum -> decrypt request",
    ),
    Combination(
        {"privacy": ("client",), "secure_aggregation": ("secagg+",)},
        True,
        "distributed DP: each site clips its update, quantizes it with conditional randomized "
        "rounding and adds its share of discrete Gaussian noise before masking; the shares of "
        "distributed_min_senders (m) sites, less the declared colluding ones, alone give the "
        "booked epsilon; the sites sign the list of senders and refuse to unmask a sum of "
        "fewer than m; the modulus keeps the noised sum from wrapping; nobody sees an "
        "un-noised sum",
        how="clip -> quantize (conditional rounding) -> noise share -> mask -> masked sum -> "
        "signed list of senders (>= m) -> unmask -> decode -> fixed denominator",
    ),
    Combination(
        {"privacy": ("sample",), "secure_aggregation": ("secagg+",)},
        True,
        "each site trains with DP-SGD and books its cost, then clips, weights, quantizes and "
        "masks its update; the server unmasks the sum only",
        how="DP-SGD -> accounting -> clip -> quantize -> mask -> masked sum -> unmask",
    ),
    Combination(
        {"secure_aggregation": ("secagg+",), "engine": ("flower",)},
        True,
        "Flower's own SecAgg+: the coordinator runs Flower's SecAggPlusWorkflow from the round "
        "loop, each site Flower's secaggplus_mod on privml's ClientApp; each site checks the "
        "server's setup against its own config, clips its update, and only the masked vector "
        "leaves it; the server unmasks the weighted average only; sites that vanish after "
        "the key exchange are recovered from their neighbours' shares up to the threshold, "
        "beyond it the round is skipped",
        how="setup (keys, checked at each site) -> share keys -> local update -> clip -> "
        "weight, quantize, mask (secaggplus_mod) -> masked sum -> unmask (shares) -> average "
        "norm check -> optimizer",
    ),
    Combination(
        {"secure_aggregation": ("secagg+",), "engine": ("simulation",)},
        True,
        "SecAgg+ pairwise masking, no key holder: the server unmasks the sum only; sites that "
        "vanish after the key exchange are recovered from their neighbours' Shamir shares "
        "up to the threshold, beyond it the round is skipped",
        how="clip -> quantize -> key exchange -> mask at sites -> masked sum -> unmask "
        "(shares) -> sum norm check -> optimizer",
    ),
    Combination(
        {"secure_aggregation": ("ckks",), "secure_checks": ("norm", "norm+cosine")},
        True,
        "norm bounding without anyone seeing an update: the server computes each update's "
        "squared norm on its ciphertexts, the key holder decrypts only those scalars, and the "
        "server scales each encrypted update to the bound before the encrypted sum",
        how="seal (no clipping) -> encrypted norms -> key holder decrypts scalars -> scale "
        "ciphertexts -> encrypted sum -> decrypt sum",
    ),
    Combination(
        {"attack": ("backdoor",), "engine": ("simulation",)},
        True,
        "attackers train on triggered copies of their records and boost their update (model "
        "replacement); results.json reports the attack success rate",
        how="poisoned data -> boost -> combine",
    ),
)
"""The table: refusals first, then the combinations known to run and how."""


def options(config: Any, *, engine: str | None = None, resume: bool = False) -> dict[str, str]:
    """The options of ``config`` that rows name (``engine`` overrides the config's)."""
    t, p = config.training, config.privacy
    return {
        "engine": engine or t.engine,
        "privacy": p.mode,
        "secure_aggregation": t.secure_aggregation,
        "aggregator": t.aggregator,
        "attack": config.attack.kind if config.attack is not None else "none",
        "features": config.model.features,
        "adaptive_clip": "on" if p.mode == "client" and p.adaptive_clip else "off",
        "accountant": p.accountant,
        "resume": "yes" if resume else "no",
        "secure_checks": t.secure_aggregation_checks,
        "secagg_modulus": "above 2**32" if t.secagg_modulus > 1 << 32 else "2**32 or below",
        "secagg_consistency": "set"
        if (t.secagg_colluding_sites is not None or t.secagg_min_senders is not None)
        else "default",
    }


def refusals(
    config: Any, *, engine: str | None = None, resume: bool = False, at_run: bool = True
) -> list[str]:
    """One message per refused row the config matches (empty: the combination runs);
    ``at_run = False`` leaves out the rows checked only when a run starts."""
    opts = options(config, engine=engine, resume=resume)
    out = []
    for row in TABLE:
        if not row.runs and row.matches(opts) and (at_run or not row.at_run):
            given = ", ".join(f"{k} = {opts[k]!r}" for k in row.when)
            msg = f"{given} do not combine: {row.reason}"
            if row.instead:
                msg += f"; instead: {row.instead}"
            out.append(msg)
    return out


def check_combination(config: Any, *, engine: str | None = None, resume: bool = False) -> None:
    """Raise :class:`~privml.errors.ConfigError` (exit 2) listing every refused combination."""
    problems = refusals(config, engine=engine, resume=resume)
    if problems:
        raise ConfigError(problems)


def table_markdown() -> str:
    """The table as Markdown (docs/architecture.md embeds it between generated markers)."""
    lines = ["| combination | verdict | why / how | instead |", "| --- | --- | --- | --- |"]
    for row in TABLE:
        verdict = "runs" if row.runs else "refused when a run starts" if row.at_run else "refused"
        why = row.reason + (f" (stages: {row.how})" if row.how else "")
        lines.append(f"| {row.label()} | {verdict} | {why} | {row.instead or ''} |")
    return "\n".join(lines) + "\n"


DOCS_START = "<!-- compat:TABLE -->\n"
DOCS_END = "<!-- /compat -->"


def write_docs(path: str) -> None:
    """Replace the table between the markers of ``path`` (docs/architecture.md)."""
    from pathlib import Path

    p = Path(path)
    text = p.read_text()
    start = text.index(DOCS_START) + len(DOCS_START)
    end = text.index(DOCS_END)
    p.write_text(text[:start] + table_markdown() + text[end:])


if __name__ == "__main__":  # python -m privml.fl.compat --write-docs [docs/architecture.md]
    import sys

    if sys.argv[1:2] == ["--write-docs"]:
        write_docs(sys.argv[2] if len(sys.argv) > 2 else "docs/architecture.md")
    else:
        print(table_markdown(), end="")
