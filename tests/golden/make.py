"""Regenerate the golden fixtures: ``PYTHONPATH=src python -m tests.golden.make [CASE ...]``.

Run it only when a change is meant to alter training results, and say why in the commit.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from tests.golden.cases import CASES, JSON, NPZ


def main(names: list[str]) -> None:
    params: dict[str, np.ndarray] = {}
    info: dict[str, object] = {}
    if names and NPZ.exists():
        with np.load(NPZ) as z:
            params = {k: z[k] for k in z.files}
        info = json.loads(JSON.read_text())
    for name in names or list(CASES):
        p, rec = CASES[name]()
        params[name] = p
        info[name] = rec
        print(f"{name}: {p.shape[0]} parameters, accuracy {rec.get('accuracy')}", flush=True)
    np.savez_compressed(NPZ, **params)
    JSON.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
