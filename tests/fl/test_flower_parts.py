"""Parts of the Flower engine that need no running SuperLink: certificates, offline settings,
the app bundle, pooled evaluation, per-site loading, bundle checks, command lines, CLI."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from privml.config import load_config, parse_config
from privml.errors import DataError, UsageError
from privml.fl.flower import protocol as P
from privml.fl.flower.certs import generate_certificates
from privml.fl.flower.env import FLOWER_OFFLINE_ENV, flower_env
from privml.fl.flower.evaluation import pooled_metrics, site_stats
from privml.fl.flower.node import _check_bundle, load_auth_key
from privml.fl.flower.processes import superlink_command, supernode_command
from privml.fl.flower.site import SiteRuntime, load_site
from privml.fl.metrics import evaluate
from privml.models.nets import ModelSpec, build_model, flat_params

# -- certificates ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("certs")
    return generate_certificates(
        folder, hosts=["coordinator.example.org", "10.1.2.3"], sites=["a", "b"]
    )


def test_server_certificate_is_signed_by_the_ca_for_the_right_names(keys) -> None:  # type: ignore[no-untyped-def]
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(keys.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName))
    ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    assert names == {"localhost", "coordinator.example.org"}
    assert ips == {"127.0.0.1", "::1", "10.1.2.3"}
    assert isinstance(server.public_key(), ec.EllipticCurvePublicKey)


def test_private_files_are_owner_only_and_keys_load(keys) -> None:  # type: ignore[no-untyped-def]
    for p in (keys.ca_key, keys.server_key, keys.superexec_secret, keys.supernode_keys["a"][0]):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE(keys.ca_cert.stat().st_mode) == 0o644
    assert len(keys.superexec_secret.read_bytes()) == 32
    priv, pub = load_auth_key(keys.supernode_keys["b"][0])
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    assert keys.supernode_keys["b"][1].read_text().startswith("ecdsa-sha2-nistp384 ")


def test_certificates_are_not_overwritten_silently(keys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError, match="already holds"):
        generate_certificates(keys.folder)
    before = keys.server_cert.read_bytes()
    generate_certificates(keys.folder, overwrite=True)
    assert keys.server_cert.read_bytes() != before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hosts": ["bad host!"]}, "'hosts' parameter"),
        ({"sites": ["a b"]}, "'sites' parameter"),
        ({"days": 0}, r"'days' parameter .* \[1, 3650\]"),
    ],
)
def test_certificate_inputs_are_validated(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        generate_certificates(tmp_path / "x", **kwargs)


def test_load_auth_key_refuses_non_ec_keys(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    p = tmp_path / "ed.key"
    p.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(UsageError, match="needs an EC"):
        load_auth_key(p)
    with pytest.raises(UsageError, match="existing private key file"):
        load_auth_key(tmp_path / "missing.key")


# -- offline settings and the app bundle --------------------------------------------------------


def test_flower_env_is_offline_and_contained(tmp_path: Path) -> None:
    before = dict(os.environ)
    env = flower_env(tmp_path / "home", base={"PATH": "/bin"})
    assert os.environ == before  # nothing changed in this process
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_HOME"] == str((tmp_path / "home").resolve())
    assert (tmp_path / "home").is_dir()
    assert set(FLOWER_OFFLINE_ENV) <= set(env)


def test_app_bundle_carries_no_code_and_no_dependencies() -> None:
    import zipfile

    from flwr.common.config import get_fab_config

    fab, digest = P.build_fab()
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert sorted(names) == [".info/CONTENT", "pyproject.toml"]
    cfg = get_fab_config(fab)
    assert cfg["project"]["dependencies"] == []
    assert cfg["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "privml.fl.flower.server_app:app",
        "clientapp": "privml.fl.flower.client_app:app",
    }
    run = SimpleNamespace(fab_id=P.FAB_ID, fab_hash=digest)
    assert _check_bundle(run, SimpleNamespace(content=fab, hash_str=digest)) is None


def test_sites_refuse_bundles_that_are_not_privml() -> None:
    fab, digest = P.build_fab()
    good = SimpleNamespace(content=fab, hash_str=digest)
    other_app = SimpleNamespace(fab_id="someone/else", fab_hash=digest)
    assert "not 'privml/privml-flower'" in str(_check_bundle(other_app, good))
    run = SimpleNamespace(fab_id=P.FAB_ID, fab_hash=digest)
    forged = SimpleNamespace(content=fab + b"x", hash_str=digest)
    assert "does not match" in str(_check_bundle(run, forged))
    from flwr.cli.build import build_fab_from_files

    evil_text = P.pyproject_toml().replace("privml.fl.flower.client_app:app", "evil:app")
    evil, _ = build_fab_from_files({"pyproject.toml": evil_text.encode()})
    import hashlib

    h = hashlib.sha256(evil).hexdigest()
    reason = _check_bundle(
        SimpleNamespace(fab_id=P.FAB_ID, fab_hash=h), SimpleNamespace(content=evil, hash_str=h)
    )
    assert "clientapp is 'evil:app'" in str(reason)


def test_fingerprint_covers_what_changes_the_computation(tmp_path: Path) -> None:
    base = load_config(None).resolved()

    def fp(**changes: dict) -> dict[str, str]:
        raw = json.loads(json.dumps(base))
        for section, values in changes.items():
            raw[section].update(values)
        return P.fingerprint(parse_config(raw))

    ref = fp()
    assert fp() == ref
    assert P.fingerprint_mismatch(ref, fp(training={"lr": 1.0})) == ["training"]
    assert P.fingerprint_mismatch(ref, fp(data={"seed": 3})) == ["data"]
    assert P.fingerprint_mismatch(ref, fp(model={"kind": "mlp"})) == ["model"]
    assert P.fingerprint_mismatch(ref, fp(training={"engine": "flower"})) == []
    assert P.fingerprint_mismatch(ref, fp(output={"html": False})) == []
    assert P.fingerprint_mismatch(ref, None) == sorted(ref)


def test_arrays_never_unpickle() -> None:
    a = np.arange(6, dtype=np.int64).reshape(2, 3)
    assert np.array_equal(P.array_from_bytes(P.array_to_bytes(a)), a)
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        P.array_from_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="expected bytes"):
        P.array_from_bytes("abc")


def test_large_arrays_travel_as_array_records() -> None:
    from flwr.app import ConfigRecord, RecordDict

    big = np.zeros(P.INLINE_LIMIT // 4 + 1, dtype=np.float32)
    values: dict = {}
    records = P.pack(values, P.PARAMS, big)
    assert P.PARAMS in records and P.PARAMS not in values
    content = RecordDict({**records, P.SETTINGS: ConfigRecord(values)})
    assert np.array_equal(P.unpack(content, P.SETTINGS, P.PARAMS), big)
    small = np.ones(3, dtype=np.float32)
    values = {}
    assert P.pack(values, P.PARAMS, small) == {}
    content = RecordDict({P.SETTINGS: ConfigRecord(values)})
    assert np.array_equal(P.unpack(content, P.SETTINGS, P.PARAMS), small)
    assert P.unpack(RecordDict({}), P.SETTINGS, P.PARAMS) is None


# -- pooled evaluation ----------------------------------------------------------------------------


@pytest.mark.parametrize(("n_features", "n_outputs"), [(8, 1), (6, 4)])
def test_pooled_metrics_equal_metrics_of_the_pooled_records(
    n_features: int, n_outputs: int
) -> None:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = build_model(ModelSpec("logistic", n_features, n_outputs))
    params = flat_params(model) * 3
    k = max(2, n_outputs)
    parts = []
    for n in (120, 45, 9):
        X = rng.random((n, n_features), dtype=np.float32)
        y = rng.integers(0, k, size=n)
        parts.append((X, y))
    stats = [site_stats(model, params, X, y) for X, y in parts]
    pooled = pooled_metrics(stats)
    X = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    ref = evaluate(model, params, X, y)
    assert pooled["n"] == ref["n"] == 174
    assert pooled["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert pooled["f1"] == pytest.approx(ref["f1"], abs=1e-12)
    assert pooled["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert pooled["auc"] == pytest.approx(ref["auc"], abs=1e-3)
    single = pooled_metrics([stats[1]])
    assert single["accuracy"] == pytest.approx(evaluate(model, params, *parts[1])["accuracy"])
    assert pooled_metrics([])["accuracy"] is None


def test_pooled_metrics_refuse_disagreeing_sites() -> None:
    torch.manual_seed(0)
    m1 = build_model(ModelSpec("logistic", 3, 1))
    m2 = build_model(ModelSpec("logistic", 3, 3))
    X = np.zeros((4, 3), np.float32)
    y = np.array([0, 1, 0, 1])
    s1 = site_stats(m1, flat_params(m1), X, y)
    s2 = site_stats(m2, flat_params(m2), X, y)
    with pytest.raises(DataError, match="disagree on the task"):
        pooled_metrics([s1, s2])


# -- a site loads only its own file ---------------------------------------------------------------


def _csv_config(tmp_path: Path, *, declare: bool = True) -> Path:
    rng = np.random.default_rng(1)
    for name in ("north", "south"):
        n = 60
        df = pd.DataFrame(
            {
                "age": rng.integers(20, 90, size=n),
                "smoker": rng.choice(["yes", "no"], size=n),
                "sick": rng.choice(["0", "1"], size=n),
            }
        )
        df.to_csv(tmp_path / f"{name}.csv", index=False)
    schema = (
        '[data.schema.age]\ntype = "numeric"\nmin = 0\nmax = 120\n'
        '[data.schema.smoker]\ntype = "categorical"\nvalues = ["yes", "no"]\n'
        if declare
        else ""
    )
    text = f"""
[data]
target = "sick"
positive = "1"
classes = ["0", "1"]
sites = [{{name = "north", path = "north.csv"}}, {{name = "south", path = "missing.csv"}}]
{schema}
[training]
rounds = 2
"""
    p = tmp_path / "study.toml"
    p.write_text(text)
    return p


def test_a_site_reads_only_its_own_file(tmp_path: Path) -> None:
    cfg = load_config(_csv_config(tmp_path))
    site, encoder, task, index = load_site(cfg, "north")  # south's file does not exist
    assert index == 0 and site.name == "north"
    assert site.n_train + site.n_test == 60
    assert encoder.n_features == 3 and task.classes == ("0", "1")
    rt = SiteRuntime(cfg, "north")
    assert rt.info().n_features == 3
    with pytest.raises(DataError, match="not found"):
        load_site(cfg, "south")
    with pytest.raises(UsageError, match="names no site"):
        load_site(cfg, "east")


def test_a_site_cannot_infer_the_shared_schema(tmp_path: Path) -> None:
    cfg = load_config(_csv_config(tmp_path, declare=False))
    with pytest.raises(DataError, match=r"columns \['age', 'smoker'\] have no declared schema"):
        load_site(cfg, "north")


def test_builtin_site_equals_its_simulated_part() -> None:
    from privml.data.federation import load_federation

    cfg = load_config(None)
    fed = load_federation(cfg)
    site, _, _, index = load_site(cfg, "hospital_b")
    assert index == 1
    np.testing.assert_array_equal(site.X_train, fed.sites[1].X_train)
    np.testing.assert_array_equal(site.y_test, fed.sites[1].y_test)


# -- command lines ------------------------------------------------------------------------------


def test_superlink_command_is_offline_tls_and_authenticated(keys) -> None:  # type: ignore[no-untyped-def]
    cmd = superlink_command(port=9999, certs=keys.folder, enable_supernode_auth=True)
    assert cmd[0].endswith("flower-superlink")
    assert "--disable-runtime-dependency-installation" in cmd
    assert cmd[cmd.index("--isolation") + 1] == "process"
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(keys.server_cert)
    assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == str(keys.superexec_secret)
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    with pytest.raises(UsageError, match="TLS is on by default"):
        superlink_command()
    with pytest.raises(UsageError, match="needs TLS"):
        superlink_command(insecure=True, enable_supernode_auth=True)
    with pytest.raises(UsageError, match="lacks"):
        superlink_command(certs=keys.folder / "nowhere")


def test_stock_supernode_command_names_the_site(tmp_path: Path) -> None:
    cmd = supernode_command(
        superlink="127.0.0.1:9093", site="north", config=tmp_path / "s.toml", insecure=True
    )
    assert cmd[cmd.index("--isolation") + 1] == "subprocess"
    node_config = cmd[cmd.index("--node-config") + 1]
    assert node_config == f'site="north" config="{(tmp_path / "s.toml").resolve()}"'
    assert "--allow-runtime-dependency-installation" not in cmd


def test_cli_superlink_prints_an_offline_command(keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from privml.fl.flower.cli import flower_app

    home = tmp_path / "home"
    args = ["superlink", "--certs", str(keys.folder), "--port", "9998", "--home", str(home)]
    res = CliRunner().invoke(flower_app, [*args, "--print-command"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert "--disable-runtime-dependency-installation" in shown["command"]
    assert shown["env"]["FLWR_TELEMETRY_ENABLED"] == "0"
    assert shown["env"]["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert shown["env"]["FLWR_HOME"] == str(home.resolve())
    assert not home.exists()  # printing creates nothing


def test_cli_insecure_mode_warns_loudly(tmp_path: Path) -> None:
    from privml.errors import InsecureOptionWarning
    from privml.fl.flower.cli import flower_app

    args = ["superlink", "--insecure", "--print-command", "--home", str(tmp_path)]
    with pytest.warns(InsecureOptionWarning, match="TLS is off"):
        res = CliRunner().invoke(flower_app, args)
    assert res.exit_code == 0
    assert "WITHOUT TLS" in res.stderr
    assert "--insecure" in json.loads(res.stdout)["command"]


def test_cli_supernode_requires_tls_material(tmp_path: Path) -> None:
    from privml.fl.flower.cli import flower_app

    res = CliRunner().invoke(
        flower_app, ["supernode", "--site", "hospital_a", "--config", str(tmp_path / "x.toml")]
    )
    assert res.exit_code != 0
    assert isinstance(res.exception, UsageError)
    assert "--root-certificates" in str(res.exception)


def test_cli_certs_command(tmp_path: Path) -> None:
    import typer

    from privml.fl.flower.cli import certs_command

    app = typer.Typer()
    app.command()(certs_command)
    app.command("noop")(lambda: None)  # keep `certs` a named sub-command
    res = CliRunner().invoke(app, ["certs-command", str(tmp_path / "d"), "--site", "x"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "d" / "supernode-x.key").exists()
    assert "0600" in res.stdout
