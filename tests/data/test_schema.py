"""Inferring a draft schema from sites' files, and writing it as TOML that parses back."""

from __future__ import annotations

import tomllib

import numpy as np
import pandas as pd
import pytest

from privml.config import ColumnSchema, parse_config
from privml.data.schema import infer_column, infer_schema, schema_to_toml
from privml.errors import SchemaError
from tests.data.sites import patient_frame


def test_infer_column_types() -> None:
    num = infer_column(pd.Series(["3", "17.5", None, "44"]))
    assert num is not None and num.type == "numeric" and num.missing
    assert num.min is not None and num.max is not None
    assert num.min <= 3 and num.max >= 44 and num.derived_from_data
    assert infer_column(pd.Series(["0", "1", "1"])) == ColumnSchema(
        type="binary", derived_from_data=True
    )
    yes_no = infer_column(pd.Series(["yes", "no", "yes"]))
    assert yes_no is not None and yes_no.values == ["no", "yes"]  # positive last
    cat = infer_column(pd.Series(["b", "a", "c", "a"]))
    assert cat is not None and cat.type == "categorical" and cat.values == ["a", "b", "c"]
    ids = infer_column(pd.Series([f"patient-{i}" for i in range(500)]))
    assert ids is None  # looks like an identifier
    assert infer_column(pd.Series([None, None], dtype=object)) is None


def test_infer_schema_over_all_sites() -> None:
    frames = {"a": patient_frame(80, 0), "b": patient_frame(40, 1)}
    frames["b"].loc[0, "age"] = 95.0  # the largest age is at site b only
    schema, skipped = infer_schema(frames, target="death")
    assert skipped == []
    assert list(schema) == ["age", "sex", "chol", "smoker"]
    assert schema["age"].type == "numeric" and schema["age"].max is not None
    assert schema["age"].max >= 95
    assert schema["sex"].type == "binary" and schema["sex"].values == ["F", "M"]
    assert schema["chol"].missing and not schema["age"].missing
    assert schema["smoker"].type == "categorical" and schema["smoker"].missing
    assert all(s.derived_from_data for s in schema.values())
    schema2, _ = infer_schema(frames, target="death", exclude=("chol",))
    assert "chol" not in schema2


def test_identifier_columns_are_skipped() -> None:
    df = patient_frame(120, 0)
    df["mrn"] = [f"MRN{i:05d}" for i in range(len(df))]
    schema, skipped = infer_schema({"a": df}, target="death")
    assert skipped == ["mrn"] and "mrn" not in schema


def test_stray_text_in_a_numeric_column_is_an_error_naming_site_and_row() -> None:
    a, b = patient_frame(60, 0), patient_frame(60, 1)
    b["age"] = b["age"].astype(object)
    b.loc[7, "age"] = "old"
    a["chol"] = a["chol"].astype(object)
    a.loc[2, "chol"] = "n/a?"
    with pytest.raises(SchemaError) as info:
        infer_schema({"a": a, "b": b}, target="death")
    problems = info.value.problems
    assert len(problems) == 2  # both columns reported
    assert any("site 'b', column 'age': non-numeric value 'old' at row 8" in p for p in problems)
    assert any("site 'a', column 'chol'" in p and "row 3" in p for p in problems)


def test_mostly_text_column_stays_categorical() -> None:
    s = pd.Series(["low", "high", "1", "low", "high"] * 4)
    spec = infer_column(s)
    assert spec is not None and spec.type == "categorical"
    schema, _ = infer_schema({"a": pd.DataFrame({"level": s})})
    assert schema["level"].type == "categorical"


def test_toml_round_trip_with_awkward_names() -> None:
    schema = {
        "age": ColumnSchema(type="numeric", min=0, max=120, impute=40.5, missing=True),
        "blood pressure": ColumnSchema(type="numeric", min=-1.5e3, max=2e3),
        'quote"d': ColumnSchema(type="categorical", values=['a"b', "c\\d", "tab\tx", "é"]),
        "flag": ColumnSchema(type="binary", values=["no", "yes"], derived_from_data=True),
    }
    text = schema_to_toml(schema, header="line one\n\nline three")
    assert text.startswith("# line one\n#\n# line three\n")
    parsed = tomllib.loads(text)["data"]["schema"]
    assert {k: ColumnSchema(**v) for k, v in parsed.items()} == schema


def test_inferred_toml_pastes_into_a_config() -> None:
    frames = {"a": patient_frame(50, 0), "b": patient_frame(30, 1)}
    schema, _ = infer_schema(frames, target="death")
    five = '[data]\ntarget = "death"\npositive = "dead"\nsites = [{name = "a", path = "a.csv"}]\n'
    cfg = parse_config(tomllib.loads(five + "\n" + schema_to_toml(schema)))
    assert cfg.data.schema == schema


def test_inferred_bounds_are_rounded_out() -> None:
    spec = infer_column(pd.Series(np.array([12.34, 98.76])))
    assert spec is not None and spec.min is not None and spec.max is not None
    assert spec.min <= 12.34 and spec.max >= 98.76
    const = infer_column(pd.Series([5.0, 5.0, 5.0]))
    assert const is not None and const.min is not None and const.max is not None
    assert const.min < 5 < const.max
