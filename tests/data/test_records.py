"""Record hashes, the record-local split and site fingerprints (the ledger's keys)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from privml.config import parse_config
from privml.data import load_federation
from privml.data.loading import read_site_file
from privml.data.records import fingerprint, held_out, record_hashes
from tests.data.sites import patient_frame, write_sites


def test_adding_or_removing_a_record_moves_no_other_record() -> None:
    """The issue's check: one record added moves 0 others, over 200 trials."""
    rng = np.random.default_rng(1)
    moved = 0
    for trial in range(200):
        df = patient_frame(int(rng.integers(5, 120)), seed=trial)
        before = held_out(record_hashes(df), 0.2, seed=7)
        new = patient_frame(1, seed=10_000 + trial)
        grown = pd.concat([df, new], ignore_index=True)
        after = held_out(record_hashes(grown), 0.2, seed=7)
        moved += int((before != after[:-1]).sum())
        k = int(rng.integers(len(df)))
        shrunk = df.drop(index=k).reset_index(drop=True)
        after = held_out(record_hashes(shrunk), 0.2, seed=7)
        moved += int((np.delete(before, k) != after).sum())
    assert moved == 0


def test_split_holds_out_the_fraction_and_depends_on_the_seed() -> None:
    df = patient_frame(4000, seed=3)
    h = record_hashes(df)
    held = held_out(h, 0.25, seed=0)
    assert stats.binomtest(int(held.sum()), len(held), 0.25).pvalue > 1e-4
    assert (held != held_out(h, 0.25, seed=1)).mean() > 0.2
    assert np.array_equal(held, held_out(h, 0.25, seed=0))


def test_a_record_hash_is_its_content_only(tmp_path: Path) -> None:
    df = patient_frame(300, seed=5)
    h = record_hashes(df)
    perm = np.random.default_rng(0).permutation(len(df))
    shuffled = df.iloc[perm].reset_index(drop=True)[list(reversed(df.columns))]
    assert np.array_equal(record_hashes(shuffled), h[perm])  # row and column order
    # the same records as CSV text and as Parquet values
    df.to_csv(tmp_path / "a.csv", index=False)
    assert np.array_equal(record_hashes(read_site_file(tmp_path / "a.csv", site="a")), h)
    pytest.importorskip("pyarrow")
    df.to_parquet(tmp_path / "a.parquet")
    assert np.array_equal(record_hashes(read_site_file(tmp_path / "a.parquet", site="a")), h)
    # numbers by value, text exactly, a renamed column or changed value is another record
    a = pd.DataFrame({"x": ["1", "2.50", "abc", None], "y": [1.0, 2.5, np.nan, 3.0]})
    b = pd.DataFrame({"x": [1.0, 2.5, np.nan, None], "y": ["1", "2.5", None, "3"]})
    ha, hb = record_hashes(a), record_hashes(b)
    assert ha[0] == hb[0] and ha[1] == hb[1] and ha[2] != hb[2] and ha[3] == hb[3]
    assert (record_hashes(a.rename(columns={"y": "z"})) != ha).all()
    c = a.copy()
    c.loc[1, "x"] = "2.51"
    assert (record_hashes(c) != ha).tolist() == [False, True, False, False]
    assert (
        record_hashes(pd.DataFrame({"x": ["-0.0"]}))[0]
        == record_hashes(pd.DataFrame({"x": [0]}))[0]
    )


def test_fingerprint_is_the_multiset_of_records() -> None:
    df = patient_frame(200, seed=8)
    fp = fingerprint(record_hashes(df), df.columns)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    shuffled = df.sample(frac=1.0, random_state=0)
    assert fingerprint(record_hashes(shuffled), shuffled.columns) == fp
    edited = df.copy()
    edited.loc[17, "age"] = 33.0 if edited.loc[17, "age"] != 33.0 else 34.0
    assert fingerprint(record_hashes(edited), edited.columns) != fp
    assert fingerprint(record_hashes(df.iloc[1:]), df.columns) != fp


@pytest.mark.filterwarnings("ignore::privml.errors.PrivacyLeakWarning")
def test_federation_splits_and_fingerprints_each_site_by_its_own_records(
    tmp_path: Path,
) -> None:
    paths = write_sites(tmp_path / "data")
    raw = {
        "data": {
            "target": "death",
            "positive": "dead",
            "sites": [{"name": f"s{i}", "path": str(p)} for i, p in enumerate(paths)],
        }
    }
    fed = load_federation(parse_config(raw))
    # a site alone gets what it gets among others (held out by its own records)
    one = {"data": {**raw["data"], "sites": raw["data"]["sites"][1:2]}}
    alone = load_federation(parse_config(one))
    assert alone.sites[0].n_test == fed.sites[1].n_test
    assert np.array_equal(alone.sites[0].y_test, fed.sites[1].y_test)
    assert alone.fingerprints["s1"] == fed.fingerprints["s1"]
    assert len(set(fed.fingerprints.values())) == 3
    # built-in data: the fingerprint of a site's frame equals the one training keys by
    from privml.data.federation import load_site_frames, site_fingerprints

    cfg = parse_config({"data": {"dataset": "breast_cancer"}})
    frames = load_site_frames(cfg)
    fps = load_federation(cfg).fingerprints
    assert fps == site_fingerprints(cfg)
    for name, df in frames.items():
        assert fingerprint(record_hashes(df), df.columns) == fps[name]
