"""The data layer: public schemas, loading and checking sites' files, schema-only encoding,
built-in datasets and partitioners for simulation."""

from privml.data.encoding import Encoder, Task
from privml.data.federation import (
    FederatedData,
    SiteData,
    declared_schema,
    load_federation,
    load_site_frames,
    resolve_schema,
)
from privml.data.schema import infer_schema, schema_to_toml

__all__ = [
    "Encoder",
    "FederatedData",
    "SiteData",
    "declared_schema",
    "Task",
    "infer_schema",
    "load_federation",
    "load_site_frames",
    "resolve_schema",
    "schema_to_toml",
]
