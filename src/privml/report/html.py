"""A self-contained HTML report (plots embedded as PNG) from a results.json mapping."""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any


def _plot_rounds(rounds: list[dict[str, Any]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    r = [x["round"] for x in rounds]
    for key in ("accuracy", "auc"):
        ys = [float(x[key]) if x.get(key) is not None else float("nan") for x in rounds]
        ax.plot(r, ys, label=key, marker="o", ms=3)
    ax.set_xlabel("round")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return "–"
    return html.escape(str(v))


def _table(rows: list[list[Any]], head: list[str]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def render_report(results: dict[str, Any]) -> str:
    m = results.get("metrics", {})
    parts = [
        f"<h1>privml run: {html.escape(str(results.get('name')))}</h1>",
        f"<p>created {html.escape(str(results.get('created')))}, privml "
        f"{html.escape(str(results.get('privml_version')))}</p>",
        "<h2>Pooled test metrics</h2>",
        _table(
            [[m.get("accuracy"), m.get("auc"), m.get("f1"), m.get("n")]],
            ["accuracy", "AUC", "F1", "test records"],
        ),
        "<h2>Sites</h2>",
        _table(
            [
                [
                    s["name"],
                    s["n_train"],
                    s["n_test"],
                    m.get("per_site", {}).get(s["name"], {}).get("accuracy"),
                ]
                for s in results.get("sites", [])
            ],
            ["site", "train", "test", "accuracy"],
        ),
    ]
    if results.get("rounds"):
        parts += [
            "<h2>Training rounds</h2>",
            f'<img alt="accuracy per round" src="data:image/png;base64,'
            f'{_plot_rounds(results["rounds"])}">',
        ]
    for section in ("privacy", "attack", "encrypted_inference", "audit"):
        if section in results:
            parts += [
                f"<h2>{section.replace('_', ' ').capitalize()}</h2>",
                f"<pre>{html.escape(json.dumps(results[section], indent=2))}</pre>",
            ]
    if results.get("notes"):
        parts += (
            ["<h2>Warnings</h2><ul>"]
            + [f"<li>{html.escape(n)}</li>" for n in results["notes"]]
            + ["</ul>"]
        )
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>privml report</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )
