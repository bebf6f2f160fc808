"""Schema-only encoding: bounds, clipping, one-hot, missing indicators, 'other', labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privml.config import ColumnSchema
from privml.data.encoding import Encoder, Task, encode_labels, resolve_task
from privml.errors import DataError, SchemaError

SCHEMA = {
    "age": ColumnSchema(type="numeric", min=0, max=100, missing=True, impute=40),
    "smoker": ColumnSchema(type="categorical", values=["never", "former", "current"]),
    "sex": ColumnSchema(type="binary", values=["F", "M"]),
    "ward": ColumnSchema(type="categorical", values=["a", "b"], other=True, missing=True),
}


def test_feature_names_follow_the_schema() -> None:
    enc = Encoder(SCHEMA)
    assert enc.feature_names == [
        "age",
        "age__missing",
        "smoker=never",
        "smoker=former",
        "smoker=current",
        "sex",
        "ward=a",
        "ward=b",
        "ward__other",
        "ward__missing",
    ]
    assert enc.n_features == 10


def test_encoding_by_hand() -> None:
    df = pd.DataFrame(
        {
            "age": ["25", None, "150", "-3"],
            "smoker": ["never", "current", "former", "never"],
            "sex": ["M", "F", "F", "M"],
            "ward": ["a", None, "zzz", "b"],
        }
    )
    X = Encoder(SCHEMA).transform(df)
    assert X.dtype == np.float32 and X.shape == (4, 10)
    expected = np.array(
        [
            # age, miss, never, former, current, sex, a, b, other, miss
            [0.25, 0, 1, 0, 0, 1, 1, 0, 0, 0],
            [0.40, 1, 0, 0, 1, 0, 0, 0, 0, 1],  # age imputed with 40; ward missing
            [1.00, 0, 0, 1, 0, 0, 0, 0, 1, 0],  # 150 clipped to the bound; 'zzz' -> other
            [0.00, 0, 1, 0, 0, 1, 0, 1, 0, 0],  # -3 clipped to 0
        ],
        dtype=np.float32,
    )
    np.testing.assert_allclose(X, expected, atol=1e-7)


def test_numeric_default_impute_is_the_midpoint() -> None:
    enc = Encoder({"x": ColumnSchema(type="numeric", min=10, max=20, missing=True)})
    X = enc.transform(pd.DataFrame({"x": [None, 12.5]}))
    np.testing.assert_allclose(X, [[0.5, 1.0], [0.25, 0.0]])


@settings(max_examples=60, deadline=None)
@given(
    lo=st.floats(-1e6, 1e6),
    span=st.floats(1e-3, 1e6),
    values=st.lists(st.floats(-1e7, 1e7), min_size=1, max_size=20),
)
def test_numeric_scaling_is_clipped_affine(lo: float, span: float, values: list[float]) -> None:
    hi = lo + span
    enc = Encoder({"x": ColumnSchema(type="numeric", min=lo, max=hi)})
    X = enc.transform(pd.DataFrame({"x": values}))[:, 0]
    v = np.asarray(values)
    expected = np.clip((v - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(X, expected.astype(np.float32), rtol=1e-6, atol=1e-6)
    assert ((X >= 0) & (X <= 1)).all()


def test_encoding_a_row_does_not_depend_on_the_rest_of_the_site() -> None:
    """Schema-only: a record encodes the same whatever else its site holds."""
    rng = np.random.default_rng(0)
    a = pd.DataFrame(
        {
            "age": rng.uniform(-20, 140, 50).astype(str),
            "smoker": rng.choice(["never", "former", "current"], 50),
            "sex": rng.choice(["F", "M"], 50),
            "ward": rng.choice(["a", "b", "c", None], 50),
        }
    )
    picked = rng.permutation(50)[:7]
    b = a.iloc[picked].reset_index(drop=True)
    enc_a, enc_b = Encoder(SCHEMA), Encoder(dict(SCHEMA))
    Xa = enc_a.transform(a, site="a")
    Xb = enc_b.transform(b, site="b")
    np.testing.assert_array_equal(Xb, Xa[picked])
    np.testing.assert_array_equal(enc_a.transform(a.iloc[[3]], site="one row")[0], Xa[3])


def test_undeclared_category_names_site_row_and_column() -> None:
    df = pd.DataFrame(
        {
            "age": [1, 2, 3],
            "smoker": ["never", "sometimes", "never"],
            "sex": ["F", "M", "X"],
            "ward": ["a", "b", "a"],
        }
    )
    with pytest.raises(DataError) as info:
        Encoder(SCHEMA).transform(df, site="hospital_b")
    problems = info.value.problems
    assert len(problems) == 2  # both bad columns, not just the first
    assert "site 'hospital_b', column 'smoker': value 'sometimes' at row 2" in problems[0]
    assert "add it to values or set other = true" in problems[0]
    assert "site 'hospital_b', column 'sex'" in problems[1] and "'X' at row 3" in problems[1]


def test_missing_values_need_missing_true() -> None:
    df = pd.DataFrame(
        {"age": [1, 2], "smoker": [None, "never"], "sex": ["F", "M"], "ward": [None, "a"]}
    )
    with pytest.raises(DataError, match=r"column 'smoker': missing values at row 1; set missing"):
        Encoder(SCHEMA).transform(df, site="s")


def test_text_and_infinity_in_a_numeric_column() -> None:
    enc = Encoder({"x": ColumnSchema(type="numeric", min=0, max=1)})
    with pytest.raises(DataError, match=r"non-numeric value 'abc' at row 2"):
        enc.transform(pd.DataFrame({"x": ["0.5", "abc"]}), site="s")
    with pytest.raises(DataError, match=r"non-numeric value 'inf' at row 1"):
        enc.transform(pd.DataFrame({"x": ["inf", "0.1"]}), site="s")


def test_unbounded_numeric_column_is_refused() -> None:
    enc = Encoder({"x": ColumnSchema(type="numeric"), "y": ColumnSchema(type="numeric")})
    with pytest.raises(SchemaError, match=r"\['x', 'y'\] have no declared bounds"):
        enc.transform(pd.DataFrame({"x": [1.0], "y": [2.0]}))


def test_binary_column_without_values() -> None:
    enc = Encoder({"flag": ColumnSchema(type="binary")})
    X = enc.transform(pd.DataFrame({"flag": ["1", "0", "true", "False", "1.0"]}))
    np.testing.assert_array_equal(X[:, 0], [1, 0, 1, 0, 1])
    with pytest.raises(DataError, match=r"'maybe' at row 2 is not 0/1/true/false"):
        enc.transform(pd.DataFrame({"flag": ["1", "maybe"]}))


def test_encoder_round_trip() -> None:
    enc = Encoder(SCHEMA)
    again = Encoder.from_dict(enc.to_dict())
    assert again.feature_names == enc.feature_names
    assert again.schema == enc.schema


# ---- labels -------------------------------------------------------------------------------


def _frames(*labels: list[object]) -> dict[str, pd.DataFrame]:
    return {f"s{i}": pd.DataFrame({"y": lab}) for i, lab in enumerate(labels)}


def test_binary_task_with_positive_string_label() -> None:
    frames = _frames(["dead", "alive", "alive"], ["alive", "dead"])
    task = resolve_task(frames, target="y", positive="dead", classes=None)
    assert task == Task("binary", "y", ("alive", "dead"))
    assert task.n_outputs == 1
    np.testing.assert_array_equal(encode_labels(frames["s0"]["y"], task), [1, 0, 0])


def test_zero_one_labels_need_no_positive() -> None:
    frames = _frames([0, 1, 1.0], ["0", "1"])
    task = resolve_task(frames, target="y", positive=None, classes=None)
    assert task.classes == ("0", "1")
    np.testing.assert_array_equal(encode_labels(frames["s0"]["y"], task), [0, 1, 1])


def test_third_label_value_in_a_binary_task_is_named() -> None:
    frames = _frames(["dead", "alive"] * 5, ["alive", "alive", "dead", "unknown", "dead"])
    with pytest.raises(DataError) as info:
        resolve_task(frames, target="y", positive="dead", classes=None)
    msg = str(info.value)
    assert "'unknown' in 1 record, first at site 's1', row 4" in msg
    assert "set data.classes" in msg


def test_string_labels_without_positive_ask_for_it() -> None:
    with pytest.raises(DataError, match="set data.positive"):
        resolve_task(_frames(["a", "b"]), target="y", positive=None, classes=None)


def test_positive_that_never_occurs() -> None:
    with pytest.raises(DataError, match=r"positive value 'Dead' .* never occurs"):
        resolve_task(_frames(["dead", "alive"]), target="y", positive="Dead", classes=None)


def test_missing_label_rows() -> None:
    with pytest.raises(DataError, match=r"site 's0', target 'y': missing label at rows 2, 3"):
        resolve_task(_frames(["a", None, None]), target="y", positive="a", classes=None)


def test_multiclass_labels() -> None:
    frames = _frames(["x", "z"], ["y"])
    task = resolve_task(frames, target="y", positive=None, classes=["x", "y", "z"])
    assert task.kind == "multiclass" and task.n_outputs == 3
    np.testing.assert_array_equal(encode_labels(frames["s0"]["y"], task), [0, 2])
    with pytest.raises(DataError, match=r"values \['w'\] \(first at site 's1', row 1\)"):
        resolve_task(_frames(["x"], ["w"]), target="y", positive=None, classes=["x", "y"])
