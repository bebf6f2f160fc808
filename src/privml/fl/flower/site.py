"""What runs at one site of a Flower deployment: its data, its stages, its evaluation.

A :class:`SiteRuntime` is built once per SuperNode process from the site's config file and its
name. It reads only that site's records (its own ``data.sites`` entry; for a built-in dataset,
its part of the simulated partition), checks and encodes them with the public schema, splits
them exactly as the simulation does, and keeps the encoded arrays in memory for every round.

Each round it runs the site side of the round engine for itself
(:class:`~privml.fl.rounds.SitePipeline`: the local update (DP-SGD under sample-level DP), a
simulated attacker if the config makes this site one, the booking of its privacy cost in its
own ledger, the encryption under secure aggregation), seeded with the site's index in the
config, so a site computes the same update as in simulation. It answers the requests the
server's stages send it: ``private`` before round 1 (the site plans its private training from
its own config, checks the plan against its own budget, books what it spends before training
and returns its private input mean), ``centre`` (the combined input centre), ``setup`` (the
secure aggregation's public material), ``keygen`` and ``decrypt`` at the key holder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privml.config import Config, load_config
from privml.data.encoding import Encoder, Task, encode_labels, resolve_task
from privml.data.federation import FederatedData, SiteData, load_federation
from privml.data.loading import check_sites, read_site_file
from privml.data.partition import train_test_split
from privml.errors import ConfigError, DataError, UsageError
from privml.fl.compat import check_combination
from privml.fl.flower import protocol
from privml.fl.flower.evaluation import EvalStats, site_stats
from privml.fl.plan import attacked_data, make_attack
from privml.fl.plan_private import SitePrivacy, site_private_parts
from privml.fl.rounds import SitePipeline, SiteStage, SiteUpdates
from privml.fl.stages.local import LocalTraining
from privml.fl.stages.secure import KeyHolderService, SealUpdates, SecureSetup
from privml.models.nets import ModelSpec, build_model
from privml.models.training import MeanGradient
from privml.pipeline import model_spec

__all__ = [
    "SiteInfo",
    "SiteRuntime",
    "check_supported",
    "load_site",
    "site_names",
]


def check_supported(config: Config) -> None:
    """Raise ConfigError for combinations the Flower engine does not run (the compatibility
    table's refusals for ``engine = "flower"``, all listed at once)."""
    check_combination(config, engine="flower")


def site_names(config: Config) -> list[str]:
    """The names of the config's sites, in config order (their index seeds their training)."""
    from privml.data.federation import site_names as names_of

    return names_of(config)


def load_site(config: Config, site: str) -> tuple[SiteData, Encoder, Task, int]:
    """Read, check, split and encode the records of one site only.

    Returns the encoded site, the encoder, the task and the site's index in the config.
    A site cannot infer a schema that the other sites share, so every column of a CSV or
    Parquet site must be declared in ``[data.schema]``.
    """
    d = config.data
    if d.dataset is not None:
        fed = load_federation(config)
        names = [s.name for s in fed.sites]
        if site not in names:
            raise UsageError(
                f"The 'site' parameter names no site of this config. Got {site!r} instead; "
                f"the sites are {names}."
            )
        i = names.index(site)
        return fed.sites[i], fed.encoder, fed.task, i
    assert d.sites is not None and d.target is not None
    names = [s.name for s in d.sites]
    if site not in names:
        raise UsageError(
            f"The 'site' parameter names no site of this config. Got {site!r} instead; the "
            f"sites are {names}."
        )
    i = names.index(site)
    entry = d.sites[i]
    df = read_site_file(Path(entry.path), site=site)
    if len(df) == 0:
        raise DataError(f"site {site!r}: no rows in {str(entry.path)!r}; give the site data")
    undeclared = [
        c for c in df.columns if c not in d.schema and c != d.target and c not in d.exclude
    ]
    if undeclared:
        raise DataError(
            f"site {site!r}: columns {undeclared} have no declared schema. In a deployment "
            "every site must encode with the same public schema, which a site cannot infer "
            "alone: declare them in [data.schema] (`privml schema infer` writes a draft) or "
            "list them in data.exclude"
        )
    schema = dict(d.schema)
    problems = check_sites({site: df}, schema=schema, target=d.target, exclude=tuple(d.exclude))
    if problems:
        raise DataError(problems)
    task = resolve_task({site: df}, target=d.target, positive=d.positive, classes=d.classes)
    encoder = Encoder(schema)
    encoder.fit_check()
    X = encoder.transform(df, site=site)
    y = encode_labels(df[d.target], task)
    tr, te = train_test_split(df, d.test_fraction, seed=d.seed)  # record-local, as simulated
    return SiteData(site, X[tr], y[tr], X[te], y[te]), encoder, task, i


@dataclass(frozen=True)
class SiteInfo:
    """What a site tells the coordinator in the handshake (all public or aggregate)."""

    name: str
    index: int
    n_train: int
    n_test: int
    n_features: int
    task: dict[str, Any]
    encoding: dict[str, Any]
    fingerprint: dict[str, str]


class SiteRuntime:
    """One site's encoded data, model and stages, kept for the whole deployment.

    Args:
        config: the deployment's config (the same file as the coordinator's).
        site: this site's name in the config.
    """

    def __init__(self, config: Config, site: str) -> None:
        check_supported(config)
        self.config = config
        self.data, self.encoder, self.task, self.index = load_site(config, site)
        fed = FederatedData([self.data], self.encoder, self.task)
        self.spec: ModelSpec = model_spec(config, fed)
        self.model = build_model(self.spec)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.rule = MeanGradient(self.model, self.spec, binary=self.task.kind == "binary")
        self.fingerprint = protocol.fingerprint(config)
        self.names = site_names(config)
        self.raw = self.data  # the records as loaded (an input centre shifts ``data``)
        self.private: SitePrivacy | None = None
        self.pipeline = self._pipeline()
        self.key_holder: KeyHolderService | None = None

    def _pipeline(self) -> SitePipeline:
        t = self.config.training
        stages: list[SiteStage] = []
        make_rule = None
        if self.private is not None:
            stages += self.private.stages
            binary = self.task.kind == "binary"
            if self.private.make_rule is not None:
                make_rule = self.private.make_rule(self.model, self.spec, binary)
        malicious = np.zeros(len(self.names), dtype=bool)
        atk = None
        if self.config.attack is not None:
            n_classes = 2 if self.task.kind == "binary" else len(self.task.classes)
            atk = make_attack(self.config.attack, self.names, t.seed, n_classes)
            malicious = atk.mask(len(self.names))
            stages.append(atk)
        local = LocalTraining(attacked_data({self.index: self.data}, atk), t, self.rule,
                              make_rule=make_rule)  # fmt: skip
        return SitePipeline(local, stages, malicious)

    @classmethod
    def from_file(cls, config_path: str | Path, site: str) -> SiteRuntime:
        """Load ``config_path`` (TOML) and build the runtime of ``site``."""
        return cls(load_config(config_path), site)

    @property
    def name(self) -> str:
        return self.data.name

    def info(self) -> SiteInfo:
        return SiteInfo(
            name=self.name,
            index=self.index,
            n_train=self.data.n_train,
            n_test=self.data.n_test,
            n_features=self.encoder.n_features,
            task=self.task.to_dict(),
            encoding=self.encoder.to_dict(),
            fingerprint=self.fingerprint,
        )

    def check_params(self, params: object) -> torch.Tensor:
        """The coordinator's parameters as a float32 tensor, or UsageError if malformed."""
        if not isinstance(params, np.ndarray) or params.dtype.kind != "f":
            raise UsageError(
                f"site {self.name!r}: the global parameters must be a float array; got "
                f"{type(params).__name__} {getattr(params, 'dtype', '')}"
            )
        if params.shape != (self.n_params,):
            raise UsageError(
                f"site {self.name!r}: the global parameters have shape {params.shape}, this "
                f"site's model has ({self.n_params},); the coordinator's config differs"
            )
        if not np.isfinite(params).all():
            raise UsageError(f"site {self.name!r}: the global parameters hold NaN or Inf")
        return torch.from_numpy(params.astype(np.float32))

    def _round(self, rnd: object) -> int:
        if (
            isinstance(rnd, bool)
            or not isinstance(rnd, int)
            or not 1 <= rnd <= self.config.training.rounds
        ):
            raise UsageError(
                f"site {self.name!r}: round must be an integer in [1, "
                f"{self.config.training.rounds}]. Got {rnd!r} instead."
            )
        return rnd

    def run_round(self, params: np.ndarray, *, rnd: int, asked: int | None = None) -> SiteUpdates:
        """The site side of round ``rnd`` from the global ``params``: local update, then this
        site's stages (attack, accounting, sealing); ``asked``: how many sites the server asked
        this round (sizes a noise share)."""
        r = self._round(rnd)
        p = self.check_params(params)
        if self.config.privacy.mode != "none" and self.private is None:
            raise UsageError(
                f"site {self.name!r}: private training is not set up for this run; the "
                "coordinator sends the 'private' request before round 1"
            )
        if self.config.training.secure_aggregation in ("paillier", "ckks") and not any(
            isinstance(s, SealUpdates) for s in self.pipeline.stages
        ):
            raise UsageError(
                f"site {self.name!r}: secure aggregation is not set up (no public key yet); "
                "the coordinator sends it before round 1"
            )
        if asked is not None and (
            isinstance(asked, bool) or not isinstance(asked, int)
            or not 1 <= asked <= len(self.names)
        ):  # fmt: skip
            raise UsageError(f"site {self.name!r}: asked must be an int in [1, "
                             f"{len(self.names)}]. Got {asked!r} instead.")  # fmt: skip
        return self.pipeline.run(r, p, np.array([self.index], dtype=np.int64), asked=asked)

    def booked(self) -> float | None:
        """The epsilon this site has booked for the current run (None without privacy)."""
        return None if self.private is None else float(self.private.booked())

    def train(self, params: np.ndarray, *, rnd: int) -> np.ndarray:
        """Local training from the global ``params`` in round ``rnd``; the update (float64)."""
        return self.run_round(params, rnd=rnd).updates[0]

    def evaluate(self, params: np.ndarray) -> EvalStats:
        """Evaluation statistics of ``params`` on this site's test records."""
        p = self.check_params(params)
        return site_stats(self.model, p, self.data.X_test, self.data.y_test)

    # -- requests of the server's stages -----------------------------------------------------

    def _secure_setup(self, counts: list[int]) -> SecureSetup:
        if len(counts) != len(self.names) or any(c < 0 for c in counts):
            raise UsageError(f"site {self.name!r}: setup sent {len(counts)} counts for "
                             f"{len(self.names)} sites")  # fmt: skip
        o = (self.private.secure if self.private is not None else None) or {}
        return SecureSetup.from_training(
            self.config.training, self.names, counts, n_params=self.n_params,
            clip=o.get("clip"), value_bound=o.get("value_bound"),
        )  # fmt: skip

    # -- private training: this site's own plan, budget, ledger and noise ------------------

    def _records(self) -> tuple[dict[str, str], dict[str, Any]]:
        """This site's fingerprint and record hashes (its ledger keeps its budget by them)."""
        d = self.config.data
        if d.dataset is not None:
            from privml.data.federation import site_records

            fps, hashes = site_records(self.config)
            return {self.name: fps[self.name]}, {self.name: hashes[self.name]}
        from privml.data.records import fingerprint, record_hashes

        assert d.sites is not None
        df = read_site_file(Path(d.sites[self.index].path), site=self.name)
        h = record_hashes(df)
        return {self.name: fingerprint(h, df.columns)}, {self.name: h}

    def private_setup(self, *, estimate_centre: bool = True) -> SitePrivacy:
        """Before round 1 of a run: plan this site's private training from its own config,
        check the plan against its own ledger's budget (refused: BudgetExceededError, nothing
        spent) and book what is spent before training. Every run starts afresh: what a
        previous run booked stays booked. ``estimate_centre=False``: the run's input centre
        is combined already (this site rejoins the run), so no private mean is computed."""
        if self.config.privacy.mode == "none":
            raise UsageError(f"site {self.name!r}: this config trains without privacy")
        from privml.dp.cli import ledger_from_config
        from privml.dp.planning import check_dp_schema
        from privml.dp.randomness import run_noise_source

        self.private, self.data = None, self.raw
        check_dp_schema(self.config, FederatedData([self.raw], self.encoder, self.task))
        fps, hashes = self._records()
        ledger = ledger_from_config(self.config, fingerprints=fps, records=hashes)
        noise = run_noise_source(self.config.training.seed)  # drawn here, never sent
        self.private = site_private_parts(self.config, self.raw, self.index, self.names,
                                          self.spec, ledger=ledger, noise=noise,
                                          estimate_centre=estimate_centre)  # fmt: skip
        self.pipeline = self._pipeline()
        return self.private

    def apply_centre(self, centre: object) -> None:
        """Centre this site's inputs on the combined private mean (from the coordinator)."""
        if self.private is None or not self.private.centring:
            raise UsageError(f"site {self.name!r}: no input centring in this run")
        width = self.raw.X_train.shape[1]
        if (
            not isinstance(centre, np.ndarray)
            or centre.dtype.kind != "f"
            or centre.shape != (width,)
            or not np.isfinite(centre).all()
        ):
            raise UsageError(f"site {self.name!r}: the input centre must be {width} finite floats")
        c = centre.astype(np.float32)
        s = self.raw
        self.data = SiteData(s.name, s.X_train - c, s.y_train, s.X_test - c, s.y_test)
        self.pipeline = self._pipeline()

    def keygen(self, counts: list[int]) -> bytes:
        """At the key holder: make the aggregation keys (once); return the public material."""
        if self.key_holder is None:
            self.key_holder = KeyHolderService(self._secure_setup(counts), self.name)
        return self.key_holder.keygen()

    def decrypt(self, aggregate: bytes, n_contributions: int) -> np.ndarray:
        """At the key holder: decrypt a sum of ``n_contributions`` (>= 2) updates."""
        if self.key_holder is None:
            raise UsageError(f"site {self.name!r} holds no aggregation key")
        return self.key_holder.decrypt(aggregate, n_contributions)

    def setup(self, counts: list[int], public: bytes) -> None:
        """Before round 1: the secure aggregation's public material and the sites' counts."""
        if self.config.training.secure_aggregation == "none":
            raise UsageError(f"site {self.name!r}: this config uses no secure aggregation")
        setup = self._secure_setup(counts)
        o = (self.private.secure if self.private is not None else None) or {}
        self.pipeline.stages = [s for s in self.pipeline.stages if not isinstance(s, SealUpdates)]
        seal = SealUpdates(setup, public, weighted=bool(o.get("weighted", True)),
                           noise=o.get("noise"))  # fmt: skip
        self.pipeline.stages.append(seal)
        self.pipeline.__post_init__()

    def check_fingerprint(self, theirs: Any) -> None:
        diff = protocol.fingerprint_mismatch(self.fingerprint, theirs)
        if diff:
            raise ConfigError(
                f"site {self.name!r}: the coordinator's config differs from this site's in "
                f"{diff}; give both the same config file"
            )
