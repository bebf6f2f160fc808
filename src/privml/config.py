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

import hashlib
import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from privml.errors import ConfigError

BUILTIN_DATASETS = ("breast_cancer", "digits", "synthetic")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    path: Path


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
    rows: int = Field(default=2000, ge=10, description="synthetic: rows per site")
    n_features: int = Field(default=10, ge=1, le=10_000, description="synthetic: features")
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    seed: int = Field(default=0, description="seed of the simulated partition and test splits")
    exclude: list[str] = Field(default_factory=list, description="columns to ignore (ids, ...)")
    schema_: dict[str, ColumnSchema] = Field(default_factory=dict, alias="schema")
    allow_inferred_schema: bool = True

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

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


class ModelConfig(_Strict):
    kind: Literal["logistic", "mlp", "cnn"] = "logistic"
    hidden: list[int] = Field(default_factory=lambda: [32])
    activation: Literal["relu", "tanh", "square", "poly2"] = "relu"
    image_shape: list[int] | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden layer widths must be >= 1 (got {self.hidden})")
        if self.image_shape is not None and (
            len(self.image_shape) != 2 or min(self.image_shape) < 1
        ):
            raise ValueError(f"image_shape must be [height, width] (got {self.image_shape})")
        return self


class TrainingConfig(_Strict):
    rounds: int = Field(default=20, gt=0, le=100_000)
    local_epochs: int = Field(default=2, gt=0, le=10_000)
    batch_size: int = Field(default=32, gt=0)
    lr: float = Field(default=1.0, gt=0, description="local SGD step size (features are in [0, 1])")
    seed: int = 0
    clients_per_round: int | None = Field(default=None, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1, description="probability a client drops out")
    aggregator: str = "fedavg"
    aggregator_params: dict[str, Any] = Field(default_factory=dict)
    max_update_norm: float | None = Field(default=None, gt=0)
    engine: Literal["simulation", "flower"] = "simulation"


class PrivacyConfig(_Strict):
    """Privacy settings. Epsilons are per site (sample level) or per client (client level)."""

    mode: Literal["none", "sample", "client"] = "none"
    epsilon: float | None = Field(default=None, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    clip: float = Field(default=1.0, gt=0)
    accountant: Literal["pld", "rdp"] = "pld"
    noise_multiplier: float | None = Field(default=None, ge=0)
    budget_epsilon: float = Field(default=10.0, gt=0)
    budget_delta: float = Field(default=1e-5, gt=0, lt=1)
    ledger: Path | None = None


class InferenceConfig(_Strict):
    encrypted: bool = False
    scheme: Literal["ckks", "paillier"] = "ckks"
    max_samples: int = Field(default=1000, gt=0)


class AuditConfig(_Strict):
    enabled: bool = True
    attacks: list[str] = Field(default_factory=lambda: ["membership"])


class OutputConfig(_Strict):
    dir: Path | None = None
    html: bool = True


class Config(_Strict):
    """A whole privml run. ``source`` is the file it came from (None for the embedded demo)."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    attack: dict[str, Any] | None = None
    output: OutputConfig = Field(default_factory=OutputConfig)

    name: str = "privml"
    source: Path | None = Field(default=None, exclude=True)

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
    shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
    return f"{loc or 'config'}: {msg}{shown}"


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
    if cfg.data.sites:
        for s in cfg.data.sites:
            if not s.path.is_absolute():
                s.path = (base / s.path).resolve()
    if cfg.privacy.ledger is not None and not cfg.privacy.ledger.is_absolute():
        cfg.privacy.ledger = (base / cfg.privacy.ledger).resolve()
    if cfg.output.dir is not None and not cfg.output.dir.is_absolute():
        cfg.output.dir = (base / cfg.output.dir).resolve()


def load_config(path: str | Path | None = None) -> Config:
    """Load and validate a TOML config; ``None`` loads the embedded demo."""
    if path is None:
        text = resources.files("privml.data").joinpath("demo/demo.toml").read_text()
        return parse_config(tomllib.loads(text), name="demo")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {str(p)!r} not found; pass an existing TOML file with --config",
        )
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=str(p)) from None
    except UnicodeDecodeError:
        raise ConfigError("not a UTF-8 text file", source=str(p)) from None
    return parse_config(raw, base_dir=p.resolve().parent, name=p.stem, source=p)
