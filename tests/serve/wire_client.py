"""A prediction client written from docs/wire-format.md alone: the standard library and SEAL's
Python bindings (``tenseal.sealapi``), no privml code.

    python wire_client.py URL TOKEN < patients.json      # [[x_1, ..., x_d], ...] encoded
                                                          # features, values in [0, 1]

Prints one JSON object: the logits, the key id, and which modules were loaded. Used by
tests/serve/test_wire_format.py against a running ``privml serve``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import sys
import urllib.request

from tenseal import sealapi as seal

MAGIC = b"PRIVMLHE"
PREFIX = struct.Struct(">8sBBI")  # magic, version, kind, header length
KIND_CKKS_PUBLIC, KIND_CKKS_FEATURES, KIND_CKKS_SCORES = 1, 2, 3
CKKS_DOMAIN = b"privml-he-ckks-public-v1"


# -- SEAL objects to and from bytes (the bindings save to paths only) -------------------------

_FD = os.memfd_create("wire-client")
_PATH = f"/proc/self/fd/{_FD}"


def save(obj: object) -> bytes:
    obj.save(_PATH)  # type: ignore[attr-defined]
    data = os.pread(_FD, os.fstat(_FD).st_size, 0)
    os.ftruncate(_FD, 0)
    return data


def load(obj: object, data: bytes, context: object) -> object:
    os.ftruncate(_FD, 0)
    os.pwrite(_FD, data, 0)
    obj.load(context, _PATH)  # type: ignore[attr-defined]
    os.ftruncate(_FD, 0)
    return obj


# -- the envelope -------------------------------------------------------------------------------


def pack(kind: int, header: dict, parts: list[bytes]) -> bytes:
    header = dict(header, parts=[len(p) for p in parts])
    hb = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return PREFIX.pack(MAGIC, 1, kind, len(hb)) + hb + b"".join(parts)


def unpack(data: bytes, kind: int) -> tuple[dict, list[bytes]]:
    magic, version, got, hlen = PREFIX.unpack_from(data)
    if magic != MAGIC or version != 1 or got != kind:
        raise ValueError(f"unexpected message (kind {got}, version {version})")
    header = json.loads(data[PREFIX.size : PREFIX.size + hlen])
    body = data[PREFIX.size + hlen :]
    if sum(header["parts"]) != len(body):
        raise ValueError("truncated or padded message")
    parts, off = [], 0
    for n in header["parts"]:
        parts.append(body[off : off + n])
        off += n
    return header, parts


def call(url: str, token: str, method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


# -- the protocol -------------------------------------------------------------------------------


def main() -> None:
    url, token = sys.argv[1], sys.argv[2]
    patients = json.load(sys.stdin)
    info = call(url, token, "GET", "/v1/model")
    reqs = info["schemes"]["ckks"]["requirements"]
    assert reqs["answer"] == "mean", "this client reads the 'mean' answer format"
    (profile,) = reqs["profiles"]  # the logistic model has one profile
    n = profile["poly_modulus_degree"]

    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(n)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(n, profile["coeff_bits"]))
    ctx = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    keygen = seal.KeyGenerator(ctx)
    secret = keygen.secret_key()
    public = seal.PublicKey()
    keygen.create_public_key(public)
    items, parts = ["params", "public_key"], [save(parms), save(public)]
    if profile["galois_steps"]:
        elts = ctx.key_context_data().galois_tool().get_elts_from_steps(profile["galois_steps"])
        items.append("galois")
        parts.append(save(keygen.create_galois_keys([int(e) for e in elts])))
    if profile["relin"]:
        items.append("relin")
        parts.append(save(keygen.create_relin_keys()))
    digest = hashlib.sha256(CKKS_DOMAIN)
    for p in parts:
        digest.update(len(p).to_bytes(8, "big") + p)
    key_id = digest.hexdigest()
    context = pack(KIND_CKKS_PUBLIC, {"scheme": "ckks", "key_id": key_id, "requirements": reqs,
                                      "layout": [{"profile": profile, "items": items}]}, parts)
    reg = call(url, token, "POST", "/v1/contexts",
               {"context": base64.b64encode(context).decode()})
    assert reg["key_id"] == key_id

    lay = reqs["layouts"]["replicated"]
    ip, hp, d = lay["Ip"], lay["Hp"], reqs["n_features"]
    slots = n // 2
    encoder = seal.CKKSEncoder(ctx)
    encryptor = seal.Encryptor(ctx, secret)
    decryptor = seal.Decryptor(ctx, secret)
    logits = []
    for x in patients:
        block = [0.0] * (ip * hp)
        for i in range(d):
            for j in range(hp):
                block[hp * i + j] = float(x[i])
        plain = seal.Plaintext()
        encoder.encode(block * (slots // len(block)), 2.0 ** lay["scale_bits"], plain)
        ct = seal.Ciphertext()
        encryptor.encrypt_symmetric(plain, ct)
        feats = pack(KIND_CKKS_FEATURES, {
            "scheme": "ckks", "role": "features", "key_id": key_id, "profile": profile["name"],
            "packing": "replicated", "n_rows": 1, "n_cols": d, "complex": False, "extra": {},
        }, [save(ct)])
        res = call(url, token, "POST", "/v1/predict",
                   {"key_id": key_id, "ciphertexts": base64.b64encode(feats).decode()})
        header, (answer, *more) = unpack(base64.b64decode(res["scores"]), KIND_CKKS_SCORES)
        assert header["key_id"] == key_id and not more  # one output, one patient
        out = load(seal.Ciphertext(), answer, ctx)
        plain = seal.Plaintext()
        decryptor.decrypt(out, plain)
        values = encoder.decode_complex(plain)
        logits.append(lay["score_factor"] * sum(v.real for v in values) / len(values))
    print(json.dumps({
        "logits": logits,
        "key_id": key_id,
        "privml_loaded": sorted(m for m in sys.modules if m.split(".")[0] == "privml"),
    }))


if __name__ == "__main__":
    main()
