"""The report of ``privml sweep``: the privacy-utility curve and its table in one HTML file."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from privml.report.html import _CSS, _esc, _img, _num, _table

__all__ = ["render_sweep_report"]


def render_sweep_report(sweep: Mapping[str, Any], png: bytes) -> str:
    """HTML for a sweep.json mapping and its curve (PNG bytes, embedded)."""
    ref = sweep.get("nonprivate") or {}
    points = sorted(sweep.get("points") or [], key=lambda p: p.get("epsilon", 0))
    rows = [[p.get("epsilon_target"), p.get("epsilon"), p.get("noise_multiplier"),
             p.get("accuracy"), p.get("balanced_accuracy"), p.get("f1"), p.get("auc")]
            for p in points]  # fmt: skip
    rows.append(["non-private", None, None, ref.get("accuracy"), ref.get("balanced_accuracy"),
                 ref.get("f1"), ref.get("auc")])  # fmt: skip
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    mode = _esc(sweep.get("mode", ""))
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>privml sweep</title><style>{_CSS}</style></head><body>"
        f"<h1>privml sweep: privacy against utility</h1>"
        f"<p class='meta'>{mode}-level DP, delta {_num(sweep.get('delta'), 2)}, accountant "
        f"{_esc(sweep.get('accountant', ''))}</p>"
        '<section id="curve"><h2>Curve</h2>'
        + _img(uri, "privacy-utility curve",
               "Each point is a full private run; dashed lines: the same model trained without "
               "DP; dotted: predicting the majority class for everyone "
               f"({_num(ref.get('majority_baseline'))}).")
        + '</section><section id="points"><h2>Points</h2>'
        + _table(["target epsilon", "epsilon reached", "noise multiplier", "accuracy",
                  "balanced accuracy", "F1", "AUC"], rows,
                 classes=[""] * len(points) + ["pooled"])
        + "<p>Every run's spend is booked in the ledger; the sweep costs the sum of its "
        "epsilons for every site. Metrics are on the held-out records, without DP.</p>"
        "</section></body></html>\n"
    )
