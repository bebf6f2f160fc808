"""The privml configuration: one TOML file, validated with pydantic.

Unknown keys are errors, every problem is reported at once (:class:`privml.errors.ConfigError`
lists them all), and relative paths resolve against the config file's folder. Everything except
``data.target`` and ``data.sites`` (or a built-in ``data.dataset``) has a default, so a user with
CSV files writes five lines::

    [data]
    target = "death"
    positive = "dead"
    sites = [{name = "a", path = "a.csv"}, {name = "b", path = "b.csv"}]
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_serializer,
    model_validator,
)

from privml.errors import ConfigError

BUILTIN_DATASETS = ("breast_cancer", "digits", "synthetic")

#: Target epsilon of a DP run that gives neither ``epsilon`` nor ``noise_multiplier``.
DEFAULT_EPSILON = 1.0


# Numbers are taken as written: an integer key refuses 2.5, "5" and true (TOML's true is not 1),
# a number key refuses "1" and true, and no key accepts inf or nan. Paths alone accept strings.
_STRICT = ConfigDict(
    extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False
)


def _no_nul(p: Path) -> Path:
    # the operating system cannot open such a name; without this it fails late as a ValueError
    if "\x00" in str(p):
        raise ValueError("a path cannot contain a NUL character (\\x00); write the file name")
    return p


FilePath = Annotated[Path, Field(strict=False), AfterValidator(_no_nul)]
#: Largest seed accepted (numpy's generators take any integer >= 0; 2**63 - 1 keeps it an int64).
MAX_SEED = 2**63 - 1


class _Strict(BaseModel):
    model_config = _STRICT


class ColumnSchema(_Strict):
    """Public metadata of one column. Declared by a person, never read off private data.

    ``derived_from_data`` marks a schema written by ``privml schema infer``: its bounds and
    categories came from the private files, and DP features refuse to use them silently.
    """

    type: Literal["numeric", "categorical", "binary"]
    min: float | None = None
    max: float | None = None
    impute: float | str | None = Field(
        default=None,
        description="value used for a missing entry (numeric default: midpoint of the bounds)",
    )
    values: list[str] | None = Field(
        default=None, description="categories (categorical) or [negative, positive] (binary)"
    )
    missing: bool = Field(
        default=False, description="missing values allowed (adds a missing-indicator column)"
    )
    other: bool = Field(
        default=False, description="map undeclared categories to an 'other' column, not an error"
    )
    derived_from_data: bool = False

    @model_validator(mode="after")
    def _check(self) -> ColumnSchema:
        if self.type == "numeric":
            if (self.min is None) != (self.max is None):
                raise ValueError("declare both min and max, or neither")
            if self.min is not None and self.max is not None and not self.min < self.max:
                raise ValueError(f"min must be < max (got min={self.min}, max={self.max})")
            if self.min is not None and self.max is not None and not math.isfinite(
                self.max - self.min
            ):
                raise ValueError(
                    f"max - min must be a finite number (got min={self.min}, max={self.max})"
                )
            if self.values is not None:
                raise ValueError("'values' is for categorical/binary columns, not numeric")
        else:
            if self.min is not None or self.max is not None:
                raise ValueError(f"min/max are for numeric columns, not {self.type}")
            if self.type == "categorical" and not self.values:
                raise ValueError('a categorical column needs values = ["...", ...]')
            if self.type == "binary" and self.values is not None and len(self.values) != 2:
                raise ValueError("a binary column's values must be [negative, positive]")
            if self.values is not None and len(set(self.values)) != len(self.values):
                raise ValueError("values must be distinct")
        return self

    @property
    def bounded(self) -> bool:
        return self.min is not None and self.max is not None


class SiteConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    path: FilePath


class DataConfig(_Strict):
    """Where the data is and what it means.

    Either ``sites`` (one CSV/Parquet file per site) or a built-in ``dataset`` split into
    ``n_sites`` simulated sites with ``partition``.
    """

    name: str | None = Field(default=None, description="dataset id used by the privacy ledger")
    target: str | None = None
    positive: str | int | float | bool | None = None
    classes: list[str] | None = None
    sites: list[SiteConfig] | None = None
    dataset: Literal["breast_cancer", "digits", "synthetic"] | None = None
    n_sites: int = Field(default=3, ge=1, le=100_000)
    partition: Literal["hospitals", "iid", "dirichlet", "column"] = "hospitals"
    alpha: float = Field(default=0.5, gt=0)
    partition_column: str | None = None
    rows: int = Field(default=2000, ge=10, le=10_000_000, description="synthetic: rows per site")
    n_features: int = Field(default=10, ge=1, le=10_000, description="synthetic: features")
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    seed: int = Field(
        default=0, ge=0, le=MAX_SEED, description="seed of the simulated partition and test splits"
    )
    exclude: list[str] = Field(default_factory=list, description="columns to ignore (ids, ...)")
    schema_: dict[str, ColumnSchema] = Field(default_factory=dict, alias="schema")
    allow_inferred_schema: bool = True

    model_config = ConfigDict(**{**_STRICT, "populate_by_name": True})

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.sites is None and self.dataset is None:
            raise ValueError(
                'give the sites ([[data.sites]] name = "..." path = "...") '
                'or a built-in dataset (dataset = "breast_cancer")'
            )
        if self.sites is not None and self.dataset is not None:
            raise ValueError("give either data.sites or data.dataset, not both")
        if self.sites is not None:
            if self.target is None:
                raise ValueError('data.target is required with your own sites (target = "...")')
            if len(self.sites) == 0:
                raise ValueError("data.sites is empty: list at least one site")
            names = [s.name for s in self.sites]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"site names must be unique; repeated: {', '.join(dup)}")
        if self.partition == "column" and self.dataset is not None and not self.partition_column:
            raise ValueError('partition = "column" needs partition_column = "..."')
        if self.partition == "hospitals" and self.dataset not in (None, "breast_cancer"):
            self.partition = "iid"
        return self

    @property
    def schema(self) -> dict[str, ColumnSchema]:  # type: ignore[override]
        return self.schema_


class HogConfig(_Strict):
    """``[model.hog]``: the HOG feature map's settings (:class:`privml.dp.features.HogFeatures`).

    All of them are fixed before training and independent of the data, so choosing them costs
    no privacy by itself (choosing them on private validation data is a search like any other).
    """

    bins: int = Field(default=8, ge=2, le=64, description="signed gradient orientation bins")
    cell: int = Field(default=2, ge=1, le=10_000, description="cell side in pixels")
    stride: int = Field(
        default=2, ge=1, le=10_000, description="distance between cells in pixels (< cell overlaps)"
    )
    cell_eps: float = Field(
        default=0.01, gt=0, le=1e6, description="floor added to a cell's squared norm"
    )
    scale: float = Field(default=4.0, gt=0, le=1e6, description="L2 norm of the feature vectors")

    def options(self) -> dict[str, Any]:
        """The keyword arguments of :class:`privml.dp.features.HogFeatures`."""
        return self.model_dump()


class ModelConfig(_Strict):
    kind: Literal["logistic", "mlp", "cnn"] = "logistic"
    hidden: list[Annotated[int, Field(ge=1, le=1_000_000)]] = Field(
        default_factory=lambda: [32], max_length=64
    )
    activation: Literal["relu", "tanh", "square", "poly2"] = "relu"
    image_shape: list[Annotated[int, Field(ge=1, le=100_000)]] | None = None
    features: Literal["none", "hog"] = Field(
        default="none",
        description="fixed, data-independent feature map before the model (hog: gradient "
        "orientation histograms of image_shape inputs; see privml.dp.features)",
    )
    hog: HogConfig = Field(
        default_factory=HogConfig,
        description='[model.hog]: the HOG map\'s settings (features = "hog" only)',
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # The default [model.hog] is left out, so the resolved config (and its hash) of every
        # config that does not set it is what it was before the table existed.
        out: dict[str, Any] = handler(self)
        if self.hog == HogConfig():
            out.pop("hog", None)
        return out

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden layer widths must be >= 1 (got {self.hidden})")
        if self.image_shape is not None and (
            len(self.image_shape) != 2 or min(self.image_shape) < 1
        ):
            raise ValueError(f"image_shape must be [height, width] (got {self.image_shape})")
        if self.kind == "cnn" and self.image_shape is None:
            raise ValueError('a cnn needs image_shape = [height, width] in [model]')
        if self.features != "none" and self.image_shape is None:
            raise ValueError(
                f'features = "{self.features}" needs image_shape = [height, width] in [model]'
            )
        if self.features != "none" and self.kind == "cnn":
            raise ValueError(
                f'features = "{self.features}" feeds a logistic or mlp model, not a cnn'
            )
        if self.features != "hog" and self.hog != HogConfig():
            raise ValueError(
                'hog: [model.hog] sets the HOG map, which only features = "hog" uses; set '
                'features = "hog" or remove [model.hog]'
            )
        if self.features == "hog" and self.image_shape is not None:
            h, w = self.image_shape
            if self.hog.cell > min(h, w):
                raise ValueError(
                    f"hog.cell ({self.hog.cell}) is larger than the {h}x{w} image; use a cell "
                    f"<= {min(h, w)}"
                )
            if min(h, w) < 3:
                raise ValueError(
                    f'features = "hog" needs an image of at least 3x3 pixels (image_shape is '
                    f"{self.image_shape})"
                )
        return self


_SECAGG_FIELDS = (
    "secagg_share_count",
    "secagg_threshold",
    "secagg_clipping_range",
    "secagg_quantization_range",
    "secagg_modulus",
    "secagg_min_senders",
    "secagg_colluding_sites",
)


class TrainingConfig(_Strict):
    rounds: int = Field(default=20, gt=0, le=100_000)
    local_epochs: int = Field(default=2, gt=0, le=10_000)
    batch_size: int = Field(default=32, gt=0, le=1_000_000)
    lr: float = Field(default=1.0, gt=0, description="local SGD step size (features are in [0, 1])")
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    clients_per_round: int | None = Field(default=None, gt=0)
    fraction: float | None = Field(
        default=None, gt=0, le=1, description="fraction of the sites sampled each round"
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="probability a client drops out")
    straggler: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="probability a sampled client's update arrives after the round closed "
        "(discarded: synchronous rounds)",
    )
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    prox_mu: float | None = Field(
        default=None, gt=0, description="FedProx proximal weight (default 0.01 with fedprox)"
    )
    aggregator: str = "fedavg"
    aggregator_params: dict[str, Any] = Field(default_factory=dict)
    server_optimizer: Literal["sgd", "momentum", "adam", "yogi", "adagrad"] = "sgd"
    server_lr: float | None = Field(
        default=None,
        gt=0,
        description="server learning rate (default: sgd/momentum 1.0, adam/adagrad 0.1, yogi 0.01)",
    )
    server_optimizer_params: dict[str, Any] = Field(default_factory=dict)
    max_update_norm: float | None = Field(default=None, gt=0)
    engine: Literal["simulation", "flower"] = "simulation"
    # Churn: how few sites a round may close with, and how long a deployment waits for sites
    min_sites_per_round: int | None = Field(
        default=None,
        gt=0,
        le=1_000_000,
        description="fewest site updates a round may use; a round with fewer is retried "
        "(Flower: once the sites are back, within wait_for_sites) or the run stops with an "
        "error (simulation, whose dropouts are seeded). Default: no minimum",
    )
    round_timeout: float = Field(
        default=600.0,
        gt=0,
        le=86_400 * 7,
        description="Flower: seconds a round waits for the sites' replies",
    )
    wait_for_sites: float = Field(
        default=300.0,
        gt=0,
        le=86_400 * 7,
        description="Flower: seconds to wait until enough sites are connected (at the start, "
        "and before retrying a round with fewer than min_sites_per_round)",
    )
    # Encrypted aggregation (privml.fl.stages.secure): sites encrypt their clipped, weighted
    # updates under the key holder's key; the server sums ciphertexts only.
    secure_aggregation: Literal["none", "paillier", "ckks", "secagg+"] = Field(
        default="none",
        description="paillier/ckks: encrypt each site's update, the server sums ciphertexts and "
        "only the key holder decrypts, and only the sum; secagg+: pairwise masking (SecAgg+), "
        "no key holder, the server unmasks the sum only (needs max_update_norm; fedavg or "
        "norm_bound)",
    )
    secure_aggregation_checks: Literal["none", "norm", "norm+cosine"] = Field(
        default="none",
        description='ckks only: "norm" bounds every update\'s L2 norm on its ciphertexts '
        "(the key holder decrypts only each site's squared norm and the bounded sum); "
        '"norm+cosine" also weights each update by max(0, cosine to the previous round\'s '
        'aggregate); needs aggregator = "norm_bound" with a fixed max_norm',
    )
    key_holder: str | None = Field(
        default=None,
        description="the site that generates the aggregation keys and decrypts the sums "
        "(default: the first site)",
    )
    secure_aggregation_key_bits: int = Field(
        default=3072, description="Paillier modulus size (3072; 2048 allowed with a warning)"
    )
    secure_aggregation_precision_bits: int = Field(
        default=24,
        ge=4,
        le=52,
        description="fixed-point resolution 2**-bits of each encrypted value (Paillier); CKKS: "
        "the flooding noise is clip * 2**-bits",
    )
    # SecAgg+ masking (privml.fl.secagg): the parameters of Flower's SecAggPlusWorkflow
    secagg_share_count: int | None = Field(
        default=None,
        ge=3,
        description="SecAgg+: shares of each site's secrets, one per neighbour including itself "
        "(odd; default min(cohort, 2 * ceil(log2 cohort) + 1))",
    )
    secagg_threshold: int | None = Field(
        default=None,
        ge=2,
        description="SecAgg+: shares needed to reconstruct a secret, > share_count / 2 "
        "(default share_count // 2 + 1)",
    )
    secagg_clipping_range: float | None = Field(
        default=None,
        gt=0,
        description="SecAgg+: each coordinate is clipped to [-range, range] before quantization "
        "(default: the L2 clip bound, which clips no coordinate)",
    )
    secagg_quantization_range: int = Field(
        default=1 << 22,
        ge=2,
        description="SecAgg+: coordinates are quantized to integers in [0, range] (2**22)",
    )
    secagg_modulus: int = Field(
        default=1 << 32,
        description="SecAgg+: masks and sums are taken modulo this power of two (2**32)",
    )
    secagg_colluding_sites: int | None = Field(
        default=None,
        ge=0,
        description="SecAgg+ in simulation: how many sites may collude with a malicious server "
        "(the consistency check's c; default threshold - 1, as many as the masking tolerates "
        "in one neighbourhood); must be below the threshold",
    )
    secagg_min_senders: int | None = Field(
        default=None,
        ge=2,
        description="SecAgg+ in simulation: the fewest senders a round may unmask; the sites "
        "sign the list of senders and unmask only a list every site on it signed, at least "
        "this long (default (cohort + secagg_colluding_sites) // 2 + 1, the least that makes "
        "the list unique; a smaller value is refused)",
    )

    @model_validator(mode="after")
    def _check_federation(self) -> TrainingConfig:
        # Federation settings: every problem at once, with the rule's own messages.
        from privml.errors import UsageError
        from privml.fl.aggregate import SERVER_DATA_PARAMS, check_params
        from privml.fl.server_opt import make_server_optimizer

        problems: list[str] = []
        if self.clients_per_round is not None and self.fraction is not None:
            problems.append("give clients_per_round or fraction, not both")
        if self.prox_mu is not None and self.strategy != "fedprox":
            problems.append('prox_mu is used only with strategy = "fedprox"; set both or neither')
        if self.prox_mu is not None and self.lr * self.prox_mu >= 2:
            problems.append(
                f"lr * prox_mu = {self.lr * self.prox_mu:g} must be < 2, or FedProx's proximal "
                "step diverges (each step scales w - w_global by 1 - lr * prox_mu); lower either"
            )
        engine_keys = SERVER_DATA_PARAMS.get(self.aggregator, {})
        rule_params = {k: v for k, v in self.aggregator_params.items() if k not in engine_keys}
        problems += check_params(self.aggregator, rule_params)
        root_size = self.aggregator_params.get("root_size")
        if "root_size" in engine_keys and root_size is not None and (
            isinstance(root_size, bool) or not isinstance(root_size, int) or root_size < 1
        ):
            problems.append(
                f"aggregator_params.root_size must be an integer >= 1 (got {root_size!r})"
            )
        root_site = self.aggregator_params.get("root_site")
        if "root_site" in engine_keys and root_site is not None and not isinstance(root_site, str):
            problems.append(
                f"aggregator_params.root_site must be a site name (got {root_site!r})"
            )
        if "lr" in self.server_optimizer_params:
            problems.append(
                "set the server learning rate with server_lr, not in server_optimizer_params"
            )
        else:
            opt = dict(self.server_optimizer_params)
            if self.server_lr is not None:
                opt["lr"] = self.server_lr
            try:
                make_server_optimizer(self.server_optimizer, **opt)
            except UsageError as exc:
                problems.append(str(exc))
        problems += self._secure_aggregation_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _secure_aggregation_problems(self) -> list[str]:
        # what secure aggregation needs of its own settings (which mechanisms it combines
        # with is privml.fl.compat's table)
        out: list[str] = []
        # set and not at the default (a resumed run's config is written out whole)
        misplaced = sorted(
            f
            for f in self.model_fields_set & set(_SECAGG_FIELDS)
            if getattr(self, f) != type(self).model_fields[f].default
        )
        if self.secure_aggregation != "secagg+" and misplaced:
            out.append(
                f"{', '.join(misplaced)} apply to secure_aggregation = \"secagg+\" only; "
                "remove them or set secure_aggregation = \"secagg+\""
            )
        if self.secure_aggregation == "none":
            return out
        sa = f'secure_aggregation = "{self.secure_aggregation}"'
        max_norm = self.aggregator_params.get("max_norm")
        if self.aggregator == "norm_bound" and max_norm is None:
            out.append(
                f"{sa} with aggregator = \"norm_bound\" needs a fixed aggregator_params.max_norm "
                "(the adaptive bound is the median of the individual update norms, which the "
                "server cannot see); the sites clip to it before encrypting"
            )
        if self.secure_aggregation_checks != "none" and (
            self.aggregator != "norm_bound" or max_norm is None
        ):
            out.append(
                f"secure_aggregation_checks = {self.secure_aggregation_checks!r} needs "
                'aggregator = "norm_bound" with '
                "aggregator_params.max_norm (the bound the server applies on ciphertexts)"
            )
        if self.secure_aggregation == "secagg+":
            from privml.fl.secagg import check_settings

            out += check_settings(self)
            if self.key_holder is not None:
                out.append(
                    'key_holder applies to secure_aggregation = "paillier" or "ckks"; SecAgg+ '
                    "has no key holder: remove it"
                )
        kb = self.secure_aggregation_key_bits
        if self.secure_aggregation == "paillier" and (kb < 2048 or kb > 8192 or kb % 256):
            out.append(
                "secure_aggregation_key_bits must be a multiple of 256 in [2048, 8192] "
                f"(3072 for 128-bit security; 2048 gives 112 bits, with a warning); got {kb}"
            )
        return out


class PrivacyConfig(_Strict):
    """Privacy settings. Epsilons are per site (sample level) or per client (client level)."""

    mode: Literal["none", "sample", "client"] = "none"
    epsilon: float | None = Field(
        default=None,
        gt=0,
        description="target epsilon of a DP run (default 1.0 unless noise_multiplier is given)",
    )
    delta: float = Field(default=1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    clip: float = Field(default=1.0, gt=0)
    accountant: Literal["pld", "rdp"] = "pld"
    noise_multiplier: float | None = Field(default=None, ge=0)
    budget_epsilon: float | None = Field(
        default=None,
        gt=0,
        description="the ledger's budget per record, set on its first use (default 10); "
        "afterwards it must match the ledger's (`privml budget set` changes it)",
    )
    budget_delta: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="the ledger's delta per record, set on its first use (default 1e-4: 10 "
        "runs at the default delta); afterwards it must match the ledger's",
    )
    ledger: FilePath | None = None
    # Private training (privml.fl.stages.private, planned by privml.dp.planning).
    adaptive_clip: bool = Field(
        default=False,
        description="client mode: adapt clip to a private quantile of update norms "
        "(Andrew et al. 2021); clip is then the initial value",
    )
    target_quantile: float = Field(
        default=0.5, gt=0, lt=1, description="adaptive clip: fraction of updates left unclipped"
    )
    clip_lr: float = Field(default=0.2, gt=0, description="adaptive clip: geometric step size")
    clipped_count_stddev: float | None = Field(
        default=None,
        gt=0,
        description="adaptive clip: noise std of the unclipped count (default expected clients/20)",
    )
    allow_data_derived_bounds: bool = Field(
        default=False,
        description="let DP training use bounds inferred from the private data (leaks them)",
    )
    distributed_min_senders: int | None = Field(
        default=None,
        ge=2,
        description='client mode under secure_aggregation = "secagg+" (distributed DP): the '
        "fewest sites whose noise shares a released sum must contain; each site adds "
        "1/(m - distributed_colluding_sites) of the noise, and the sites refuse to unmask a "
        "round with fewer senders (default: 90% of a round's expected senders, the expected "
        "cohort less training.dropout, rounded up)",
    )
    distributed_colluding_sites: int = Field(
        default=0,
        ge=0,
        description="distributed DP: sites assumed to collude with the server (they know their "
        "own noise shares); the noise is calibrated for distributed_min_senders minus these",
    )
    center_inputs: bool = Field(
        default=True,
        description="sample mode (and hog features): centre the model's inputs on a private "
        "mean, paid as one extra local epoch of DP-SGD steps per site",
    )

    @model_validator(mode="after")
    def _check_private_training(self) -> PrivacyConfig:
        if self.mode == "none":
            return self
        problems = []
        if self.epsilon is None and self.noise_multiplier is None:
            self.epsilon = DEFAULT_EPSILON
        if self.noise_multiplier == 0:
            problems.append(
                'noise_multiplier = 0 adds no noise and gives no privacy; use mode = "none"'
            )
        elif self.noise_multiplier is not None and not 0.05 <= self.noise_multiplier <= 1e6:
            problems.append(
                f"noise_multiplier = {self.noise_multiplier:g} is outside [0.05, 1e6], the range "
                "the accountant evaluates (below 0.05 epsilon is in the thousands)"
            )
        if self.epsilon is not None and not 0.01 <= self.epsilon <= 1000:
            problems.append(
                f"epsilon = {self.epsilon:g} is outside [0.01, 1000]: below, the noise drowns "
                "any signal and cannot be calibrated; above, the guarantee means nothing"
            )
        if self.adaptive_clip and self.mode != "client":
            problems.append('adaptive_clip applies to mode = "client" only')
        if self.budget_delta is not None and self.delta > self.budget_delta:
            problems.append(
                f"delta = {self.delta:g} exceeds budget_delta = {self.budget_delta:g}; "
                "lower delta or raise budget_delta"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class InferenceConfig(_Strict):
    """Encrypted-inference check run after training (results.json ``encrypted_inference``)."""

    encrypted: bool = False
    scheme: Literal["ckks", "paillier"] = "ckks"
    max_samples: int = Field(
        default=1000, gt=0, le=10_000_000, description="test records encrypted"
    )
    n_single: int = Field(default=20, gt=0, le=100_000, description="single-patient queries timed")
    key_bits: int = Field(default=3072, ge=2048, le=8192, description="Paillier modulus size")
    max_context_bytes: int = Field(default=10_000_000, gt=0, le=2**31)


AuditAttack = Literal[
    "membership", "lira", "canary", "evasion", "inversion", "backdoor", "poisoning"
]  # fmt: skip
AUDIT_ATTACKS: tuple[AuditAttack, ...] = (
    "membership", "lira", "canary", "evasion", "inversion", "backdoor", "poisoning"
)  # fmt: skip


class AuditConfig(_Strict):
    """The security audit (:mod:`privml.security.audit`; docs/security.md).

    ``enabled``: every ``privml run`` reports a quick membership inference beside its epsilon.
    ``attacks``: what ``privml audit`` runs by default. The other keys tune the attacks.
    """

    enabled: bool = True
    attacks: list[AuditAttack] = Field(
        default_factory=lambda: list(AUDIT_ATTACKS), min_length=1
    )
    strict: bool = Field(
        default=True,
        description="fail (exit 5) when measured leakage exceeds the accountant's epsilon",
    )
    confidence: float = Field(default=0.95, gt=0, lt=1)
    max_records: int = Field(
        default=2000, ge=10, le=10_000_000, description="records per attacked group"
    )
    shadow_models: int = Field(default=8, ge=2, le=256, description="LiRA shadow models")
    evasion_norm: Literal["inf", "2"] = "inf"
    evasion_budgets: list[float] = Field(default_factory=lambda: [0.02, 0.05, 0.1], min_length=1)
    evasion_steps: int = Field(default=20, ge=1, le=1000)
    evasion_category_changes: int = Field(
        default=1, ge=0, le=1000,
        description="categorical/binary columns an evasion may move to another valid value",
    )  # fmt: skip
    adversarial_eps: float = Field(default=0.1, gt=0, description="adversarial training budget")
    adversarial_method: Literal["auto", "pgd", "trades"] = Field(
        default="auto",
        description="auto: TRADES with beta chosen on validation records (refused if every "
        "candidate collapses); pgd: PGD-AT; trades: TRADES at beta 6",
    )
    adversarial_betas: list[float] = Field(
        default_factory=lambda: [0.5, 2.0, 6.0], min_length=1,
        description="TRADES trade-offs tried by adversarial_method = auto",
    )  # fmt: skip
    canaries: int = Field(
        default=1000, ge=10, le=1_000_000,
        description="random canaries of the one-run privacy audit (half in the training data)",
    )  # fmt: skip
    backdoor_non_iid_sites: int = Field(
        default=4, ge=0, le=1000,
        description="also measure the backdoor on this many Dirichlet(0.5) hospitals (0: no)",
    )  # fmt: skip
    inversion_records: int = Field(default=1, ge=1, le=64, description="records per site batch")
    inversion_noise_multiplier: float = Field(default=1.0, gt=0)
    inversion_iterations: int = Field(default=300, ge=1, le=100_000)
    poisoning_aggregators: list[str] = Field(
        default_factory=lambda: ["fedavg", "median", "trimmed_mean", "krum"], min_length=1
    )

    @model_validator(mode="after")
    def _check_audit(self) -> AuditConfig:
        from privml.fl.aggregate import AGGREGATORS

        problems = [
            f"evasion_budgets must be > 0 (got {b})" for b in self.evasion_budgets if not b > 0
        ]
        problems += [
            f"adversarial_betas must be > 0 (got {b})" for b in self.adversarial_betas if not b > 0
        ]
        if self.backdoor_non_iid_sites == 1:
            problems.append("backdoor_non_iid_sites must be 0 (off) or >= 2")
        problems += [
            f"poisoning_aggregators: unknown rule {a!r}; choose from {sorted(AGGREGATORS)}"
            for a in self.poisoning_aggregators
            if a not in AGGREGATORS
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self


class AttackConfig(_Strict):
    """Simulated Byzantine sites, to measure how robust the aggregation is (simulation only).

    ``kind`` is the attack; ``sites`` (names or 0-based positions) or ``fraction`` (of the
    sites, drawn once per run from the training seed) says who attacks; the kind's parameters
    sit beside them: ``scale`` (sign_flip, scale; default 10), ``sigma`` (gaussian; 1), ``z``
    (alie; default from Baruch et al.'s formula), ``epsilon`` (ipm; 0.1).
    """

    kind: Literal["sign_flip", "scale", "gaussian", "label_flip", "alie", "ipm", "backdoor"]
    sites: list[str | int] | None = None
    fraction: float | None = Field(default=None, gt=0, lt=1)
    scale: float | None = None
    sigma: float | None = None
    z: float | None = None
    epsilon: float | None = None
    # kind = "backdoor" (privml.security.attacks.backdoor): trigger poisoning and
    # model replacement (Bagdasaryan et al. 2020).
    trigger: Literal["pixel", "feature"] | None = Field(
        default=None, description="default: pixel for image models, feature otherwise"
    )
    trigger_size: int | None = Field(
        default=None, ge=1, le=10_000, description="pixel patch side"
    )
    trigger_features: list[str | int] | None = Field(
        default=None, description="encoded feature names or positions the trigger sets"
    )
    trigger_value: float | None = Field(default=None, description="encoded value (default 1.0)")
    target: str | int | None = Field(default=None, description="class the trigger forces")
    poison_fraction: float | None = Field(default=None, gt=0, le=1)
    boost: float | Literal["replace", "none"] | None = Field(
        default=None, description="update scale factor; 'replace' = model replacement (default)"
    )
    start_round: int | None = Field(default=None, ge=1, le=100_000)

    @model_validator(mode="after")
    def _check(self) -> AttackConfig:
        from privml.fl.attacks import check_attack_params

        problems: list[str] = []
        if (self.sites is None) == (self.fraction is None):
            problems.append("give the attacking sites = [...] or a fraction = ..., exactly one")
        if self.sites is not None:
            if not self.sites:
                problems.append("sites is empty: list at least one attacking site")
            if len({str(x) for x in self.sites}) != len(self.sites):
                problems.append("sites lists a site twice")
            if any(isinstance(x, int) and x < 0 for x in self.sites):
                problems.append("site positions must be >= 0")
        given = {
            k: v
            for k, v in (("scale", self.scale), ("sigma", self.sigma), ("z", self.z),
                         ("epsilon", self.epsilon))
            if v is not None
        }
        backdoor_keys = [
            k
            for k in ("trigger", "trigger_size", "trigger_features", "trigger_value", "target",
                      "poison_fraction", "boost", "start_round")
            if getattr(self, k) is not None
        ]  # fmt: skip
        if self.kind == "backdoor":
            problems += [f"{k} is not a backdoor parameter" for k in given]
            if self.trigger == "feature" and self.trigger_size is not None:
                problems.append("trigger_size is for trigger = 'pixel'")
            if self.trigger == "pixel" and self.trigger_features is not None:
                problems.append("trigger_features is for trigger = 'feature'")
            if isinstance(self.boost, float) and not self.boost > 0:
                problems.append(f"boost must be > 0, 'replace' or 'none' (got {self.boost})")
        else:
            problems += check_attack_params(self.kind, given)
            problems += [f"{k} is for kind = 'backdoor' only" for k in backdoor_keys]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def kind_params(self) -> dict[str, float]:
        """The parameters given for this kind (defaults are the attack's own)."""
        return {
            k: float(v)
            for k, v in (("scale", self.scale), ("sigma", self.sigma), ("z", self.z),
                         ("epsilon", self.epsilon))
            if v is not None
        }


class OutputConfig(_Strict):
    dir: FilePath | None = None
    html: bool = True


class Config(_Strict):
    """A whole privml run. ``source`` is the file it came from (None for the embedded demo)."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    attack: AttackConfig | None = None
    output: OutputConfig = Field(default_factory=OutputConfig)

    name: str = "privml"
    source: FilePath | None = Field(default=None, exclude=True)
    _overrides: list[str] = PrivateAttr(default_factory=list)

    @property
    def overrides(self) -> list[str]:
        """The ``section.key=value`` overrides applied on top of the file (``--set``)."""
        return self._overrides

    @overrides.setter
    def overrides(self, value: list[str]) -> None:
        self._overrides = list(value)

    @model_validator(mode="after")
    def _check_federation(self) -> Config:
        # the round's cohort must be large enough for the aggregator, where the number
        # of sites is known before loading (same formula as privml.fl.engine.cohort_size).
        import math

        from privml.errors import UsageError
        from privml.fl.aggregate import SERVER_DATA_PARAMS, min_clients

        t = self.training
        problems: list[str] = []
        n_sites = None
        if self.data.sites is not None:
            n_sites = len(self.data.sites)
        elif self.data.dataset is not None and self.data.partition != "column":
            n_sites = self.data.n_sites
        if n_sites is not None:
            if t.clients_per_round is not None:
                k = min(t.clients_per_round, n_sites)
            elif t.fraction is not None:
                k = max(1, min(n_sites, math.floor(t.fraction * n_sites + 0.5)))
            else:
                k = n_sites
            keys = SERVER_DATA_PARAMS.get(t.aggregator, {})
            params = {k2: v for k2, v in t.aggregator_params.items() if k2 not in keys}
            try:
                need = min_clients(t.aggregator, params)
            except UsageError:
                need = 1
            if k < need:
                problems.append(
                    f"training: aggregator {t.aggregator!r} with {params or 'its defaults'} "
                    f"needs at least {need} client updates per round; this config samples {k} "
                    f"of {n_sites} sites. Sample more clients or change the aggregator."
                )
            m = t.min_sites_per_round
            if m is not None and m > k and self.privacy.mode != "client":
                problems.append(
                    f"training.min_sites_per_round = {m} is more than the {k} sites this config "
                    f"samples per round (of {n_sites}): no round could ever close. Lower it to "
                    f"at most {k}, or sample more sites"
                )
            a = self.attack
            if a is not None and a.sites is not None:
                bad = [x for x in a.sites if isinstance(x, int) and x >= n_sites]
                if bad:
                    problems.append(f"attack.sites: positions {bad} are outside 0..{n_sites - 1}")
        # which mechanisms combine: the one compatibility table
        from privml.fl.compat import refusals

        problems += refusals(self, at_run=False)
        if t.secure_aggregation != "none":
            if (t.max_update_norm is None and t.aggregator == "fedavg"
                    and self.privacy.mode != "client"):  # fmt: skip
                problems.append(
                    f'training: secure_aggregation = "{t.secure_aggregation}" needs '
                    "max_update_norm = ... (the L2 bound each site clips its update to before "
                    "encrypting; it also bounds every coordinate, which sizes the encrypted "
                    "values); the server cannot check norms of encrypted updates. With "
                    "client-level DP the sites clip to [privacy] clip instead"
                )
            if n_sites is not None and (n_sites < 2 or k < 2):
                problems.append(
                    "training: secure aggregation needs at least 2 updates per round (the key "
                    f"holder never decrypts a single site's update); this config samples {k} of "
                    f"{n_sites} sites"
                )
            if t.secure_aggregation == "secagg+" and n_sites is not None:
                from privml.fl.secagg import cohort_problems

                problems += cohort_problems(t, k)
            names = [s.name for s in self.data.sites] if self.data.sites is not None else None
            if t.key_holder is not None and names is not None and t.key_holder not in names:
                problems.append(
                    f"training.key_holder: no site named {t.key_holder!r} (sites: "
                    f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def dataset_id(self) -> str:
        """Identity of the data for the privacy ledger."""
        return self.data.name or self.data.dataset or self.name

    def resolved(self) -> dict[str, Any]:
        """The config as plain JSON-able data, defaults filled in."""
        return json.loads(self.model_dump_json(by_alias=True, exclude={"source"}))

    def config_hash(self) -> str:
        blob = json.dumps(self.resolved(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + ("schema" if part == "schema_" else str(part))
    return out


def _format_error(err: Any) -> str:
    loc = _loc(tuple(p for p in err["loc"] if not str(p).startswith("function-after")))
    typ = err["type"]
    msg = err["msg"].removeprefix("Value error, ")
    if typ == "extra_forbidden":
        return f"{loc}: unknown key; remove it or check its spelling"
    if typ == "missing":
        return f"{loc}: required key is missing"
    got = err.get("input")
    shown = "" if isinstance(got, dict | list) or got is None else f" (got {_toml_repr(got)})"
    if isinstance(got, bool) and typ in ("int_type", "float_type"):
        msg = "must be a number; true/false is not one"
    elif typ == "int_type" and isinstance(got, float):
        msg = "must be a whole number (an integer, written without a decimal point)"
    elif typ in ("int_type", "float_type") and isinstance(got, str):
        msg = "must be a number, not text; remove the quotes"
    elif typ == "finite_number":
        msg = "must be a finite number (inf and nan are not allowed)"
    elif typ in ("int_type", "float_type", "string_type", "bool_type", "list_type", "dict_type",
                 "model_type", "model_attributes_type"):  # fmt: skip
        want = {"int_type": "an integer", "float_type": "a number", "string_type": "text",
                "bool_type": "true or false", "list_type": "a list [...]",
                "dict_type": "a table of keys", "model_type": "a table of keys",
                "model_attributes_type": "a table of keys"}[typ]  # fmt: skip
        msg = f"must be {want}, not {_toml_type(got)}"
    return f"{loc or 'config'}: {msg}{shown}"


def _toml_repr(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def parse_config(
    raw: dict[str, Any],
    *,
    base_dir: Path | None = None,
    name: str = "privml",
    source: Path | None = None,
) -> Config:
    """Validate a config mapping. All problems are raised together as one ConfigError."""
    raw = dict(raw)
    raw.setdefault("name", name)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        problems = [_format_error(e) for e in exc.errors()]
        raise ConfigError(problems, source=str(source) if source else None) from None
    cfg.source = source
    if base_dir is not None:
        _resolve_paths(cfg, base_dir)
    return cfg


def _resolve_paths(cfg: Config, base: Path) -> None:
    from privml.safe_io import resolve_path

    if cfg.data.sites:
        for s in cfg.data.sites:
            if not s.path.is_absolute():
                s.path = resolve_path(base / s.path)
    if cfg.privacy.ledger is not None and not cfg.privacy.ledger.is_absolute():
        cfg.privacy.ledger = resolve_path(base / cfg.privacy.ledger)
    if cfg.output.dir is not None and not cfg.output.dir.is_absolute():
        cfg.output.dir = resolve_path(base / cfg.output.dir)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"section.key=value"`` -> (``["section", "key"]``, value). The value is read as a TOML
    value (``5``, ``0.5``, ``true``, ``[16, 8]``, ``"text"``); anything that is not one is
    taken as a string, so ``--set data.target=death`` needs no quotes.

    Raises:
        UsageError: no ``=``, or a key that is not ``section.key`` (dotted, non-empty parts).
    """
    from privml.errors import UsageError

    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(p.strip() for p in parts):
        raise UsageError(
            f"--set expects section.key=value, e.g. --set training.rounds=5 or "
            f"--set privacy.epsilon=2. Got {text!r}."
        )
    value = value.strip()
    try:
        parsed: Any = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return [p.strip() for p in parts], parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of the config mapping ``raw`` with each ``section.key=value`` set.

    Raises:
        UsageError: a malformed override, or one that descends into a key that is not a table.
    """
    from privml.errors import UsageError

    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(
                    f"--set {text}: {'.'.join(parts[: i + 1])} is not a table of keys, so it "
                    "has no key to set"
                )
            node = child
        node[parts[-1]] = value
    return out


def load_config(
    source: str | Path | Mapping[str, Any] | Config | None = None,
    *,
    overrides: Sequence[str] = (),
) -> Config:
    """Load and validate a config: a TOML file's path, a mapping with the same structure as
    the TOML file, a :class:`Config` (returned as is unless overridden), or ``None`` for the
    embedded demo. ``overrides`` are ``"section.key=value"`` strings (``privml run --set``),
    applied before validation and recorded in :attr:`Config.overrides`.

    Raises:
        ConfigError: the file is missing or not TOML, or the config is invalid (every problem
            listed).
        UsageError: a malformed override.
    """
    if isinstance(source, Config):
        if not overrides:
            return source
        raw = source.resolved()
        cfg = parse_config(apply_overrides(raw, overrides), name=source.name, source=source.source)
        cfg.overrides = [*source.overrides, *overrides]
        return cfg
    elif isinstance(source, Mapping):
        raw = apply_overrides(dict(source), overrides)
        cfg = parse_config(raw, name=str(raw.get("name", "privml")), base_dir=Path.cwd())
    elif source is None:
        text = resources.files("privml.data").joinpath("demo/demo.toml").read_text()
        cfg = parse_config(apply_overrides(tomllib.loads(text), overrides), name="demo")
    else:
        cfg = _load_file(Path(source), overrides)
    cfg.overrides = list(overrides)
    return cfg


#: Largest config file read (a config with 100,000 sites listed is about 6 MB).
MAX_CONFIG_BYTES = 32 * 1024**2


def _load_file(p: Path, overrides: Sequence[str]) -> Config:
    from privml.safe_io import MAX_NESTING, nesting_depth, read_bytes_bounded

    if not p.exists() and not p.is_symlink():
        raise ConfigError(
            f"config file {str(p)!r} not found; pass an existing TOML file with --config",
        )
    data = read_bytes_bounded(
        p, max_bytes=MAX_CONFIG_BYTES, what="config file", error=lambda m: ConfigError(m)
    )
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=str(p)) from None
    except UnicodeDecodeError:
        raise ConfigError("not a UTF-8 text file", source=str(p)) from None
    except RecursionError:
        raise ConfigError(
            f"lists or tables nest too deeply (limit {MAX_NESTING})", source=str(p)
        ) from None
    if nesting_depth(raw) > MAX_NESTING:
        raise ConfigError(f"lists or tables nest too deeply (limit {MAX_NESTING})", source=str(p))
    raw = apply_overrides(raw, overrides)
    from privml.safe_io import resolve_path

    return parse_config(raw, base_dir=resolve_path(p).parent, name=p.stem, source=p)
