"""From a config to per-site encoded arrays: built-in partitions, users' CSV files, checks."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from privml.config import parse_config
from privml.data import load_federation
from privml.data.encoding import Encoder
from privml.errors import DataError, PrivacyLeakWarning
from tests.data.sites import patient_frame, write_sites


def _builtin(**data: object) -> dict[str, object]:
    return {"data": {"dataset": "breast_cancer", **data}}


def test_demo_hospitals_are_unequal_with_held_out_splits() -> None:
    fed = load_federation(parse_config(_builtin()))
    assert [s.name for s in fed.sites] == ["hospital_a", "hospital_b", "hospital_c"]
    sizes = [s.n_train + s.n_test for s in fed.sites]
    assert sum(sizes) == 569 and sizes[0] > sizes[1] > sizes[2]
    for s in fed.sites:
        n = s.n_train + s.n_test  # record-local split: Binomial(n, 0.2) held out
        assert abs(s.n_test - 0.2 * n) <= 4 * (0.16 * n) ** 0.5
        assert s.X_train.dtype == np.float32 and s.X_train.shape[1] == 30
        assert set(np.unique(s.y_test)) == {0, 1}
    assert fed.task.classes == ("benign", "malignant") and fed.inferred_columns == []


def test_each_record_lands_in_exactly_one_site_and_split() -> None:
    fed = load_federation(parse_config(_builtin(partition="iid", n_sites=7)))
    X = np.concatenate([np.concatenate([s.X_train, s.X_test]) for s in fed.sites])
    assert len(X) == 569
    from privml.data import datasets

    d = datasets.breast_cancer()
    full = Encoder(d.schema).transform(d.frame)
    as_set = {r.tobytes() for r in full}
    assert {r.tobytes() for r in X} == as_set  # identical encoding wherever a record lands


def test_iid_into_100_sites() -> None:
    fed = load_federation(parse_config(_builtin(partition="iid", n_sites=100)))
    assert len(fed.sites) == 100 and fed.sites[0].name == "site_000"
    assert {s.n_train + s.n_test for s in fed.sites} <= {5, 6}
    assert all(s.n_train >= 1 for s in fed.sites)


def test_dirichlet_and_column_partitions() -> None:
    fed = load_federation(
        parse_config({"data": {"dataset": "digits", "partition": "dirichlet", "n_sites": 5,
                               "alpha": 0.2}})
    )
    mixes = [np.bincount(np.concatenate([s.y_train, s.y_test]), minlength=10) for s in fed.sites]
    top_share = [m.max() / m.sum() for m in mixes]
    assert np.mean(top_share) > 0.3  # label skew (IID would be about 0.1)
    assert fed.task.kind == "multiclass" and fed.task.n_outputs == 10
    cfg = parse_config(
        _builtin(partition="column", partition_column="mean_radius", n_sites=4)
    )
    fed2 = load_federation(cfg)
    assert len(fed2.sites) == 4


def test_loading_is_deterministic_for_a_seed() -> None:
    a = load_federation(parse_config(_builtin(partition="dirichlet", seed=3)))
    b = load_federation(parse_config(_builtin(partition="dirichlet", seed=3)))
    c = load_federation(parse_config(_builtin(partition="dirichlet", seed=4)))
    for sa, sb in zip(a.sites, b.sites, strict=True):
        np.testing.assert_array_equal(sa.X_train, sb.X_train)
        np.testing.assert_array_equal(sa.y_test, sb.y_test)
    assert any(
        sa.n_train != sc.n_train or not np.array_equal(sa.y_train, sc.y_train)
        for sa, sc in zip(a.sites, c.sites, strict=True)
    )


def _own(tmp_path: Path, **data: object) -> dict[str, object]:
    paths = write_sites(tmp_path)
    sites = [{"name": f"s{i}", "path": str(p)} for i, p in enumerate(paths)]
    return {"data": {"target": "death", "positive": "dead", "sites": sites, **data}}


def test_own_csvs_with_inferred_schema_warn_and_are_marked(tmp_path: Path) -> None:
    with pytest.warns(PrivacyLeakWarning, match="inferred from the private data"):
        fed = load_federation(parse_config(_own(tmp_path)))
    assert fed.inferred_columns == ["age", "sex", "chol", "smoker"]
    assert fed.task.classes == ("alive", "dead")
    assert fed.encoder.feature_names == [
        "age", "sex", "chol", "chol__missing",
        "smoker=current", "smoker=former", "smoker=never", "smoker__missing",
    ]  # fmt: skip
    for s in fed.sites:
        assert np.isfinite(s.X_train).all() and s.X_train.min() >= 0 and s.X_train.max() <= 1


def test_declared_columns_are_not_inferred(tmp_path: Path) -> None:
    raw = _own(tmp_path)
    raw["data"]["schema"] = {  # type: ignore[index]
        "age": {"type": "numeric", "min": 0, "max": 120},
        "sex": {"type": "categorical", "values": ["F", "M"]},
        "chol": {"type": "numeric", "min": 50, "max": 400, "missing": True},
        "smoker": {"type": "categorical", "values": ["never", "former", "current"],
                   "missing": True},
    }  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fully declared schema warns about nothing
        fed = load_federation(parse_config(raw))
    assert fed.inferred_columns == []
    raw["data"]["schema"]["age"]["derived_from_data"] = True  # type: ignore[index]
    with pytest.warns(PrivacyLeakWarning, match=r"\['age'\] is marked derived_from_data"):
        fed = load_federation(parse_config(raw))
    assert fed.inferred_columns == ["age"]


def test_all_site_problems_are_reported_together(tmp_path: Path) -> None:
    raw = _own(tmp_path, allow_inferred_schema=False)
    raw["data"]["schema"] = {  # type: ignore[index]
        "age": {"type": "numeric", "min": 0, "max": 120},
        "sex": {"type": "binary", "values": ["F", "M"]},
        "chol": {"type": "numeric", "min": 50, "max": 400},  # but chol has missing values
        "smoker": {"type": "categorical", "values": ["never", "current"], "missing": True},
    }
    with pytest.raises(DataError) as info:
        load_federation(parse_config(raw))
    problems = info.value.problems
    assert len(problems) == 6  # chol and smoker, at each of the 3 sites
    assert any("site 's2', column 'chol': missing values at rows" in p for p in problems)
    assert any("site 's0', column 'smoker': value 'former'" in p for p in problems)


def test_a_column_at_some_sites_only(tmp_path: Path) -> None:
    raw = _own(tmp_path)
    p = Path(raw["data"]["sites"][1]["path"])  # type: ignore[index]
    pd.read_csv(p).assign(ward="x").to_csv(p, index=False)
    with pytest.raises(DataError, match=r"column 'ward' is at sites \['s1'\] but not at sites "
                       r"\['s0', 's2'\].*data\.exclude"):
        load_federation(parse_config(raw))
    raw["data"]["exclude"] = ["ward"]  # type: ignore[index]
    with pytest.warns(PrivacyLeakWarning):
        fed = load_federation(parse_config(raw))
    assert "ward" not in fed.encoder.schema


def test_parquet_sites(tmp_path: Path) -> None:
    paths = []
    for i in range(2):
        p = tmp_path / f"s{i}.parquet"
        patient_frame(60, i).to_parquet(p)
        paths.append(p)
    raw = {"data": {"target": "death", "positive": "dead",
                    "sites": [{"name": f"s{i}", "path": str(p)} for i, p in enumerate(paths)]}}
    with pytest.warns(PrivacyLeakWarning):
        fed = load_federation(parse_config(raw))
    assert sum(s.n_train + s.n_test for s in fed.sites) == 120


def test_unsupported_file_type(tmp_path: Path) -> None:
    p = tmp_path / "s.xlsx"
    p.write_bytes(b"x")
    raw = {"data": {"target": "y", "sites": [{"name": "a", "path": str(p)}]}}
    with pytest.raises(DataError, match="neither CSV .* nor Parquet"):
        load_federation(parse_config(raw))


def test_problems_at_many_sites_name_each_site_and_its_own_rows(tmp_path: Path) -> None:
    """All sites are checked in one pass; each message still names its site and local rows."""
    n = 40
    paths = write_sites(tmp_path, sizes=(8,) * n)
    bad = {3: [1, 6], 17: [4], 39: [0, 2, 3, 5, 6, 7, 1]}  # site -> 0-based rows
    for i, rows in bad.items():
        df = pd.read_csv(paths[i], dtype=object)
        df.loc[rows, "age"] = "n/a?"
        df.to_csv(paths[i], index=False)
    raw = {"data": {"target": "death", "positive": "dead",
                    "sites": [{"name": f"s{i:02d}", "path": str(p)} for i, p in
                              enumerate(paths)],
                    "schema": {"age": {"type": "numeric", "min": 0, "max": 120},
                               "sex": {"type": "binary", "values": ["F", "M"]},
                               "chol": {"type": "numeric", "min": 50, "max": 400,
                                        "missing": True},
                               "smoker": {"type": "categorical", "missing": True,
                                          "values": ["never", "former", "current"]}}}}  # fmt: skip
    with pytest.raises(DataError) as info:
        load_federation(parse_config(raw))
    assert info.value.problems == [
        "site 's03', column 'age': non-numeric value 'n/a?' at rows 2, 7; fix the file or "
        "declare the column categorical",
        "site 's17', column 'age': non-numeric value 'n/a?' at row 5; fix the file or declare "
        "the column categorical",
        "site 's39', column 'age': non-numeric value 'n/a?' at rows 1, 2, 3, 4, 6 and 2 more; "
        "fix the file or declare the column categorical",
    ]


def test_sites_are_views_of_one_pool_and_a_replaced_site_is_seen() -> None:
    from privml.data.federation import SiteData

    fed = load_federation(parse_config(_builtin(partition="iid", n_sites=9)))
    assert fed.pool is not None
    X, y, offsets = fed.train_arrays()
    assert X is fed.pool.X_train and X.dtype == np.float32 and X.flags.c_contiguous
    for i, s in enumerate(fed.sites):  # no copy per site: views of the pooled arrays
        assert np.shares_memory(s.X_train, X) and np.shares_memory(s.X_test, fed.pool.X_test)
        np.testing.assert_array_equal(X[offsets[i] : offsets[i + 1]], s.X_train)
    Xt, yt = fed.pooled_test()
    np.testing.assert_array_equal(Xt, np.concatenate([s.X_test for s in fed.sites]))
    Xs, ys, offs = fed.train_arrays(np.array([4, 1]))
    np.testing.assert_array_equal(ys, np.concatenate([fed.sites[4].y_train, fed.sites[1].y_train]))
    assert offs.tolist() == [0, fed.sites[4].n_train, fed.sites[4].n_train + fed.sites[1].n_train]
    s0 = fed.sites[0]
    fed.sites[0] = SiteData(s0.name, s0.X_train[:2], s0.y_train[:2], s0.X_test, s0.y_test)
    X2, y2, offsets2 = fed.train_arrays()  # the pool no longer describes the sites
    assert len(y2) == len(y) - s0.n_train + 2 and offsets2[1] == 2


def test_synthetic_sites_are_the_same_records_as_site_by_site() -> None:
    """The pooled path gives every site exactly its records, each split by its own content."""
    from privml.data import datasets, partition

    cfg = parse_config({"data": {"dataset": "synthetic", "n_sites": 50, "rows": 12, "seed": 4}})
    fed = load_federation(cfg)
    d = datasets.synthetic(n_rows=600, n_features=10, seed=4, n_sites=50)
    site = d.frame["_site"].to_numpy()
    assert (np.diff(site) >= 0).all()  # records come site after site
    enc = Encoder(d.schema)
    for i, s in enumerate(fed.sites):
        rows = d.frame[site == i].drop(columns="_site").reset_index(drop=True)
        X = enc.transform(rows, site=s.name)
        y = (rows["outcome"] == "event").to_numpy().astype(np.int64)
        tr, te = partition.train_test_split(rows, 0.2, seed=4)
        np.testing.assert_array_equal(s.X_train, X[tr])
        np.testing.assert_array_equal(s.y_test, y[te])


def test_a_schema_for_the_target_never_makes_it_a_feature(tmp_path: Path) -> None:
    """Declaring the target's bounds (to query it with DP) must not let the model read it."""
    df = patient_frame(200, seed=3)
    df["cens"] = (df["death"] == "dead").astype(int)  # a numeric copy of the label
    df.to_csv(tmp_path / "a.csv", index=False)
    schema = {
        "age": {"type": "numeric", "min": 0, "max": 120},
        "chol": {"type": "numeric", "min": 0, "max": 400, "missing": True},
        "sex": {"type": "categorical", "values": ["F", "M"]},
        "smoker": {"type": "categorical", "values": ["never", "former", "current"],
                   "missing": True},
        "cens": {"type": "numeric", "min": 0, "max": 1},
    }  # fmt: skip
    raw = {"data": {"target": "cens", "positive": 1, "exclude": ["death"], "schema": schema,
                    "sites": [{"name": "a", "path": str(tmp_path / "a.csv")}]}}  # fmt: skip
    fed = load_federation(parse_config(raw))
    assert "cens" not in fed.encoder.schema and "death" not in fed.encoder.schema
    assert not any(n.startswith(("cens", "death")) for n in fed.encoder.feature_names)
    assert fed.n_features == 1 + 1 + 2 + 3 + 2  # age, chol(+missing), sex, smoker(+missing)


def test_a_run_of_consecutive_sites_is_taken_without_a_copy() -> None:
    from privml.data.federation import SiteData
    from privml.fl.stages.local import cohort_data

    fed = load_federation(parse_config(_builtin(partition="iid", n_sites=6)))
    assert fed.pool is not None
    data = cohort_data(fed.sites)
    assert np.shares_memory(data.X.numpy(), fed.pool.X_train)
    middle = cohort_data(fed.sites[2:5])
    assert np.shares_memory(middle.X.numpy(), fed.pool.X_train)
    want = np.concatenate([s.X_train for s in fed.sites[2:5]])
    np.testing.assert_array_equal(middle.X.numpy(), want)
    assert middle.offsets.tolist() == [0, *np.cumsum([s.n_train for s in fed.sites[2:5]])]
    # not consecutive, or a site whose records were replaced: a copy of the right records
    picked = cohort_data([fed.sites[4], fed.sites[1]])
    assert not np.shares_memory(picked.X.numpy(), fed.pool.X_train)
    s = fed.sites[3]
    flipped = SiteData(s.name, s.X_train, 1 - s.y_train, s.X_test, s.y_test)
    mixed = cohort_data([*fed.sites[:3], flipped, *fed.sites[4:]])
    np.testing.assert_array_equal(mixed.y.numpy(), np.concatenate(
        [x.y_train for x in [*fed.sites[:3], flipped, *fed.sites[4:]]]))  # fmt: skip
