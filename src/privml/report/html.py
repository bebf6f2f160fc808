"""The run report: one self-contained HTML file (plots inline as PNG, no script, no network)
for the people who decide on a model: a consortium's data protection officer and a clinician.

Sections, each drawn only when results.json holds what it needs (a missing or partial section
is left out, never an error): the headline, results by site beside their baselines, learning
curves per round (pooled and per site), the final model's ROC, calibration and confusion
matrix, privacy (unit, accounting, epsilon per site by round, the budget, what is released
outside it), encrypted inference, the security audit with baselines and verdicts, the config in
brief, notes, and every other section of results.json as plain tables.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = ["SECTIONS", "render_report"]

SECTIONS = {
    "summary": "Summary",
    "sites": "Results by site",
    "learning": "Learning curves",
    "diagnostics": "The final model",
    "privacy": "Privacy",
    "encrypted-inference": "Encrypted inference",
    "audit": "Security audit",
    "config": "Configuration",
    "notes": "Notes",
    "other": "Other details",
}
"""Section id -> heading, in report order."""

_SHOWN = {
    "schema",
    "privml_version",
    "name",
    "created",
    "task",
    "sites",
    "model",
    "rounds",
    "metrics",
    "privacy",
    "notes",
    "config",
    "config_hash",
    "overrides",
    "encrypted_inference",
    "audit",
    "timing",
    "schema_inferred_from_data",
}

_CSS = """
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;
 max-width:64rem;margin:0 auto;padding:1.5rem;overflow-wrap:anywhere}
h1{font-size:1.6rem;margin:.2rem 0}h2{font-size:1.25rem;margin-top:2.2rem;
 border-bottom:2px solid #dde3ea;padding-bottom:.2rem}h3{font-size:1.05rem;margin-bottom:.3rem}
.meta{color:#5b6577;font-size:.9rem}
nav{font-size:.9rem;margin:.8rem 0}nav a{margin-right:.9rem;white-space:nowrap}
table{border-collapse:collapse;margin:.5rem 0;max-width:100%}
th,td{border:1px solid #d5dbe3;padding:.25rem .55rem;vertical-align:top}
th{background:#f2f5f8;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.pooled td{font-weight:600;background:#f8fafc}
.kv th{width:16rem;font-weight:500}
.box{border-radius:6px;padding:.7rem 1rem;margin:.8rem 0}
.warn{background:#fff4e5;border-left:5px solid #e8590c}.ok{background:#ebfbee;
 border-left:5px solid #2f9e44}.info{background:#eef4fb;border-left:5px solid #1c7ed6}
.bad{color:#c92a2a;font-weight:600}.good{color:#2b8a3e;font-weight:600}
img{max-width:100%;height:auto;display:block;margin:.4rem 0}
figure{margin:.6rem 0}figcaption{color:#5b6577;font-size:.88rem}
.cards{display:flex;flex-wrap:wrap;gap:.7rem}.card{border:1px solid #d5dbe3;border-radius:6px;
 padding:.5rem .9rem;min-width:9rem}.card b{display:block;font-size:1.35rem}
.card span{color:#5b6577;font-size:.85rem}
pre{white-space:pre-wrap;background:#f6f8fa;padding:.6rem;font-size:.82rem;max-width:100%}
details{margin:.5rem 0}summary{cursor:pointer;color:#1c5fa8}
@media print{nav{display:none}h2{break-after:avoid}figure,table{break-inside:avoid}}
"""


# ------------------------------------------------------------------------------ formatting


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _num(v: Any, digits: int = 3) -> str:
    """Numbers for people: 3 decimals for rates, integers as such, inf and NaN in words."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "not defined"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 10 ** (-digits)):
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}"
    return _esc(v)


def _size(n: Any) -> str:
    if not isinstance(n, int | float):
        return "–"
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return "–"  # pragma: no cover


def _cell(v: Any) -> str:
    if isinstance(v, _Raw):
        return f"<td>{v}</td>"
    numeric = isinstance(v, int | float) and not isinstance(v, bool)
    return f'<td class="n">{_num(v)}</td>' if numeric else f"<td>{_plain(v)}</td>"


def _plain(v: Any) -> str:
    """Any JSON value as compact readable text (nested values as key: value lists)."""
    if isinstance(v, Mapping):
        return "; ".join(f"{_esc(k)}: {_plain(x)}" for k, x in v.items()) or "–"
    if isinstance(v, list | tuple):
        return ", ".join(_plain(x) for x in v) if v else "–"
    if isinstance(v, int | float) or v is None:
        return _num(v)
    return _esc(v)


def _table(
    head: Sequence[str], rows: Iterable[Sequence[Any]], *, classes: Sequence[str] = ()
) -> str:
    th = "".join(f"<th>{_esc(h)}</th>" for h in head)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(_cell(c) for c in row) + "</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _kv(items: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th>{_cell(v)}</tr>" for k, v in items if v is not None)
    return f'<table class="kv">{rows}</table>' if rows else ""


def _box(kind: str, text: str) -> str:
    return f'<div class="box {kind}">{text}</div>'


# ------------------------------------------------------------------------------ plots


def _figure(
    draw: Callable[[Any], None], *, width: float = 7.0, height: float = 3.0, ncols: int = 1
) -> str:
    """A PNG data URI of a matplotlib figure drawn by ``draw(axes)`` (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    draw(axes)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(uri: str, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img alt="{_esc(alt)}" src="{uri}">{cap}</figure>'


def _nums(values: Iterable[Any]) -> list[float]:
    return [
        float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan
        for v in values
    ]


# ------------------------------------------------------------------------------ sections


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, Mapping):
            return None
        d = d.get(p)
    return d


def _chance(results: Mapping[str, Any]) -> float:
    classes = _get(results, "task", "classes") or []
    return 1 / max(2, len(classes))


def _summary(results: Mapping[str, Any]) -> str:
    from privml.baselines import baseline_warning

    m = results.get("metrics")
    if not isinstance(m, Mapping):
        return ""
    cards = [
        ("balanced accuracy", m.get("balanced_accuracy"), f"chance {_chance(results):.2f}"),
        ("AUC", m.get("auc"), "chance 0.50"),
        (
            "F1",
            m.get("f1"),
            "positive class" if _get(results, "task", "kind") == "binary" else "macro",
        ),
        ("accuracy", m.get("accuracy"), f"majority baseline {_num(m.get('majority_baseline'))}"),
    ]
    out = ['<div class="cards">']
    for label, v, sub in cards:
        if v is not None:
            out.append(
                f'<div class="card"><span>{label}</span><b>{_num(v)}</b>'
                f"<span>{_esc(sub)}</span></div>"
            )
    out.append("</div>")
    n_sites = len(results.get("sites") or [])
    task = results.get("task") or {}
    target = task.get("target")
    what = f"predicts <b>{_esc(target)}</b>" if target else "was trained"
    classes = task.get("classes") or []
    if task.get("kind") == "binary" and len(classes) == 2:
        what += f" (positive class: {_esc(classes[1])})"
    out.append(
        f"<p>The model {what} across {n_sites} site(s); every figure is measured on records "
        f"each site held out from training ({_num(m.get('n'))} in all).</p>"
    )
    warning = baseline_warning(dict(m), classes)
    if warning:
        out.append(_box("warn", f"<b>Degenerate model:</b> {_esc(warning)}."))
    part = results.get("participation")
    if isinstance(part, Mapping) and part.get("degraded"):
        lines = "; ".join(str(w) for w in part.get("warnings") or [])
        out.append(_box("warn", f"<b>Degraded run:</b> {_esc(lines)}."))
    priv = results.get("privacy")
    if isinstance(priv, Mapping):
        mode = priv.get("mode", "none")
        if mode == "none":
            out.append(
                _box(
                    "warn",
                    "<b>No differential privacy:</b> the model and the figures "
                    "below carry no formal privacy guarantee for the patients whose "
                    "records trained it.",
                )
            )
        else:
            out.append(
                _box(
                    "info",
                    f"<b>{_esc(mode).capitalize()}-level differential privacy:"
                    f"</b> epsilon {_num(priv.get('epsilon'))}, delta "
                    f"{_num(priv.get('delta'), 2)} (unit: {_esc(priv.get('unit', '?'))}).",
                )
            )
    return "".join(out)


def _sites(results: Mapping[str, Any]) -> str:
    m, sites = results.get("metrics"), results.get("sites")
    if not isinstance(m, Mapping) or not isinstance(sites, list):
        return ""
    binary = _get(results, "task", "kind") == "binary"
    head = ["site", "train", "test"] + (["prevalence"] if binary else [])
    head += ["majority baseline", "accuracy", "balanced accuracy", "F1", "AUC"]

    def row(name: Any, n_train: Any, n_test: Any, x: Mapping[str, Any]) -> list[Any]:
        r = [name, n_train, n_test] + ([x.get("prevalence")] if binary else [])
        return r + [
            x.get(k) for k in ("majority_baseline", "accuracy", "balanced_accuracy", "f1", "auc")
        ]

    per_site = m.get("per_site") or {}
    rows = [
        row(s.get("name"), s.get("n_train"), s.get("n_test"), per_site.get(s.get("name")) or {})
        for s in sites
        if isinstance(s, Mapping)
    ]
    rows.append(
        row(
            "pooled",
            sum(s.get("n_train") or 0 for s in sites if isinstance(s, Mapping)),
            m.get("n"),
            m,
        )
    )
    expl = (
        "<p><b>Majority baseline</b>: the accuracy of predicting the most frequent outcome for "
        "everyone, which a useful model must beat. <b>Balanced accuracy</b>: the mean of the "
        f"per-class recalls (chance {_chance(results):.2f}); unlike accuracy it does not reward "
        "ignoring a rare outcome. AUC is not defined (–) where a site's test records hold one "
        "class only.</p>"
    )
    return _table(head, rows, classes=[""] * (len(rows) - 1) + ["pooled"]) + expl


def _learning(results: Mapping[str, Any]) -> str:
    rounds = [r for r in results.get("rounds") or [] if isinstance(r, Mapping)]
    if not rounds:
        return ""
    xs = [r.get("round") for r in rounds]
    sites = sorted(
        {s for r in rounds for s in (r.get("per_site") or {})},
        key=lambda s: (
            [x.get("name") for x in results.get("sites", [])].index(s)
            if s in [x.get("name") for x in results.get("sites", [])]
            else 10**9
        ),
    )

    def draw(axes: Any) -> None:
        from matplotlib.ticker import MaxNLocator

        for ax, key, label in (
            (axes[0], "loss", "test loss (cross-entropy)"),
            (axes[1], "auc", "test AUC"),
        ):
            for s in sites[:12]:
                ax.plot(
                    xs,
                    _nums(_get(r, "per_site", s, key) for r in rounds),
                    lw=1,
                    alpha=0.75,
                    label=s,
                )
            ax.plot(xs, _nums(r.get(key) for r in rounds), color="black", lw=2.2, label="pooled")
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(label, fontsize=10)
            ax.grid(alpha=0.3)
        axes[1].set_ylim(top=1.01)
        axes[1].legend(fontsize=7, loc="lower right")

    uri = _figure(draw, width=9, height=3.2, ncols=2)
    caption = (
        "After each round, the global model on the held-out records: pooled (black) and "
        "each site's own (thin lines)."
        if sites
        else "After each round, the global model on the pooled held-out records."
    )
    out = [_img(uri, "loss and AUC per round", caption)]
    skipped = [r.get("round") for r in rounds if r.get("skipped")]
    if skipped:
        out.append(f"<p>Rounds that left the model unchanged: {_plain(skipped)}.</p>")
    return "".join(out)


def _diagnostics(results: Mapping[str, Any]) -> str:
    m = results.get("metrics")
    if not isinstance(m, Mapping):
        return ""
    out = []
    curves = m.get("curves") if isinstance(m.get("curves"), Mapping) else None
    roc = _get(curves, "roc") if curves else None
    cal = _get(curves, "calibration") if curves else None
    panels: list[tuple[str, Mapping[str, Any]]] = [
        (k, v) for k, v in (("roc", roc), ("cal", cal)) if isinstance(v, Mapping)
    ]
    if panels:

        def draw(axes: Any) -> None:
            for ax, (kind, data) in zip(axes, panels, strict=True):
                if kind == "roc":
                    ax.plot(
                        _nums(data.get("fpr", [])),
                        _nums(data.get("tpr", [])),
                        lw=2,
                        label=f"model (AUC {_num(m.get('auc'))})",
                    )
                    ax.plot([0, 1], [0, 1], "--", color="gray", label="chance")
                    ax.set_xlabel("false-positive rate")
                    ax.set_ylabel("true-positive rate")
                    ax.set_title("ROC curve", fontsize=10)
                else:
                    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
                    ax.plot(
                        _nums(data.get("predicted", [])),
                        _nums(data.get("observed", [])),
                        marker="o",
                        lw=2,
                        label="model",
                    )
                    ax.set_xlabel("predicted probability")
                    ax.set_ylabel("observed frequency")
                    ax.set_title(f"calibration ({data.get('of', '')})", fontsize=10)
                ax.set_xlim(0, 1)
                ax.set_ylim(0, 1.01)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8, loc="lower right")

        uri = _figure(draw, width=4.2 * len(panels), height=3.6, ncols=len(panels))
        out.append(
            _img(
                uri,
                "ROC curve and calibration",
                "Pooled held-out records. Calibration: records grouped by predicted "
                "probability (tenths); a calibrated model's points lie on the diagonal.",
            )
        )
    conf = m.get("confusion")
    classes = _get(results, "task", "classes") or []
    if isinstance(conf, list) and conf and all(isinstance(r, list) for r in conf):
        names = classes if len(classes) == len(conf) else [str(i) for i in range(len(conf))]
        rows = [[f"true {names[i]}", *r] for i, r in enumerate(conf)]
        out.append("<h3>Confusion matrix (pooled, threshold 0.5)</h3>")
        out.append(_table(["", *(f"predicted {n}" for n in names)], rows))
    return "".join(out)


def _privacy(results: Mapping[str, Any]) -> str:
    p = results.get("privacy")
    if not isinstance(p, Mapping):
        return ""
    out = []
    mode = p.get("mode", "none")
    unit = p.get("unit")
    if mode == "none":
        out.append(
            _box(
                "warn",
                "Training was <b>not</b> differentially private: no epsilon "
                "bounds what the model reveals about any patient.",
            )
        )
    else:
        relation = (
            "add/remove one"
            if "add/remove" in str(unit)
            else "replace one"
            if "replace" in str(unit)
            else None
        )
        out.append(
            _kv(
                [
                    ("level", f"{mode}-level DP"),
                    ("protected unit", unit),
                    ("neighbouring relation", relation),
                    ("epsilon (largest over the sites)", p.get("epsilon")),
                    ("target epsilon", p.get("epsilon_target")),
                    ("delta", p.get("delta")),
                    ("accountant", p.get("accountant")),
                    ("noise multiplier", p.get("noise_multiplier")),
                    (
                        "clipping norm",
                        p.get("max_grad_norm") if mode == "sample" else p.get("clip"),
                    ),
                    ("sampling", p.get("sampling")),
                    ("input centring", p.get("input_centering")),
                ]
            )
        )
    eps = p.get("epsilon_per_site")
    budget = _get(p, "budget", "per_site") or {}
    if isinstance(eps, Mapping) and eps:
        head = ["site", "epsilon (this run)", "noise multiplier"]
        per = p.get("per_site") if isinstance(p.get("per_site"), Mapping) else {}
        rows = []
        for site, e in eps.items():
            b = budget.get(site) or {}
            rows.append(
                [
                    site,
                    e,
                    _get(per, site, "noise_multiplier"),
                    b.get("budget_epsilon"),
                    b.get("spent_epsilon"),
                    b.get("remaining_epsilon"),
                ]
            )
        head += ["budget", "spent (all runs)", "remaining"]
        out.append("<h3>Per site</h3>" + _table(head, rows))
        if budget:
            out.append(
                f"<p>Budget and spend from the privacy ledger after this run "
                f"({_esc(_get(p, 'budget', 'composition'))}).</p>"
            )
    by_round = p.get("epsilon_by_round")
    if isinstance(by_round, Mapping) and by_round:

        def draw(axes: Any) -> None:
            from matplotlib.ticker import MaxNLocator

            ax = axes[0]
            for site, pts in by_round.items():
                pts = [q for q in pts if isinstance(q, list) and len(q) == 2]
                ax.step([q[0] for q in pts], _nums(q[1] for q in pts), where="post", label=site)
            caps = {b.get("budget_epsilon") for b in budget.values() if isinstance(b, Mapping)}
            for cap in sorted(c for c in caps if isinstance(c, int | float)):
                ax.axhline(cap, color="firebrick", ls="--", lw=1, label=f"budget {cap:g}")
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("epsilon spent (this run)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)

        out.append(
            _img(
                _figure(draw, width=7, height=3),
                "epsilon per site by round",
                "Epsilon booked in the ledger by each site, cumulative over the "
                "rounds (accountant's composition).",
            )
        )
    elif mode == "client":
        out.append(
            "<p>Client-level DP books the whole run's epsilon for every site before "
            "round 1 (one DP-FedAvg event), so the spend does not grow by round.</p>"
        )
    released = []
    listed = p.get("not_accounted")
    if isinstance(listed, str):
        listed = [listed]
    for item in listed or []:
        released.append(_esc(str(item)[:1].upper() + str(item)[1:] + "."))
    released.append(
        "The test metrics, curves and confusion matrix in this report are computed "
        "on the sites' held-out records without noise; they are released outside "
        "any privacy budget."
    )
    inferred = results.get("schema_inferred_from_data") or []
    if inferred:
        released.append(
            f"The bounds and categories of {len(inferred)} column(s) ("
            f"{_esc(', '.join(map(str, inferred[:8])))}) were read off the private "
            "data, not declared."
        )
    if isinstance(results.get("audit"), Mapping):
        released.append(
            "The security audit's figures are measured on training and test records without noise."
        )
    if p.get("noise"):
        released.append(f"Noise source: {_plain(p['noise'])}")
    out.append(
        "<h3>Released outside the privacy budget</h3><ul>"
        + "".join(f"<li>{r}</li>" for r in released)
        + "</ul>"
    )
    return "".join(out)


def _encrypted(results: Mapping[str, Any]) -> str:
    e = results.get("encrypted_inference")
    if not isinstance(e, Mapping):
        return ""
    if e.get("skipped"):
        return _box("info", f"Not checked ({_esc(e.get('scheme', ''))}): {_esc(e['skipped'])}")
    params: Mapping[str, Any] = e.get("parameters") or {}
    ct: Mapping[str, Any] = e.get("ciphertext_bytes") or {}
    sec = params.get("security_bits") or e.get("security_bits")
    rows = [
        ("scheme", f"{_esc(str(e.get('scheme', '')).upper())} ({_esc(e.get('model', ''))} model)"),
        ("security level", f"{sec}-bit" if sec else None),
        ("records checked", e.get("n")),
        ("agreement with the plaintext model", e.get("agreement")),
        ("largest score error", e.get("max_abs_error")),
        ("latency, one patient (ms)", e.get("single_query_latency_ms")),
        ("throughput, batch (patients/s)", e.get("batch_throughput_per_s")),
        (
            "public key material sent once",
            _size(e.get("public_context_bytes")) if e.get("public_context_bytes") else None,
        ),
        ("ciphertext per query", _size(ct.get("single_query")) if ct.get("single_query") else None),
        (
            "ciphertext per patient in a batch",
            _size(ct.get("batch_per_patient")) if ct.get("batch_per_patient") else None,
        ),
    ]
    out = [
        _kv(rows),
        "<p>The clinic encrypts the features, the server computes the score on ciphertexts "
        "and only the clinic decrypts it. Agreement is the share of records whose predicted "
        "class is the same encrypted and in the clear.</p>",
    ]
    if params:
        out.append(
            "<details><summary>encryption parameters</summary>"
            f"<pre>{_esc(json.dumps(params, indent=1, default=str))}</pre></details>"
        )
    return "".join(out)


def _verdict(row: Mapping[str, Any]) -> str:
    status = row.get("status", "ok")
    if status in ("degenerate", "no effect", "refused", "not run"):
        cls = "bad" if status in ("degenerate", "no effect") else ""
        reason = f": {_esc(row['reason'])}" if row.get("reason") else ""
        return f'<span class="{cls}">{_esc(status)}</span>{reason}'
    base, worse = row.get("baseline"), row.get("worse", "higher")
    a, b = row.get("without_defence"), row.get("with_defence")
    val = b if isinstance(b, int | float) else a
    if isinstance(base, int | float) and isinstance(val, int | float):
        gap = (val - base) if worse == "higher" else (base - val)
        if gap <= 0.02 * max(1.0, abs(base)):
            return '<span class="good">at baseline</span>'
        return f'<span class="bad">{_num(abs(val - base))} beyond baseline</span>'
    return "–"


def _audit(results: Mapping[str, Any]) -> str:
    a = results.get("audit")
    if not isinstance(a, Mapping):
        return ""
    out = []
    rows = [r for r in a.get("rows") or [] if isinstance(r, Mapping)]
    if rows:
        out.append(
            _table(
                [
                    "attack",
                    "metric",
                    "without defence",
                    "with defence",
                    "defence",
                    "baseline",
                    "defence cost",
                    "verdict",
                ],
                [
                    [
                        r.get("attack"),
                        r.get("metric"),
                        r.get("without_defence"),
                        r.get("with_defence"),
                        r.get("defence") or "–",
                        (
                            f"{_num(r['baseline'])} ({r.get('baseline_kind') or ''})"
                            if r.get("baseline") is not None
                            else "–"
                        ),
                        r.get("defence_cost"),
                        _Raw(_verdict(r)),
                    ]
                    for r in rows
                ],
            )
        )
        out.append(
            "<p>Baseline: what the metric is without any attack skill (chance, the "
            "majority class, the clean model). A defence cost is the clean accuracy it "
            "gives up.</p>"
        )
    mem = a.get("membership") if isinstance(a.get("membership"), Mapping) else None
    if mem is None:
        mem = _get(a, "details", "membership", "with_defence") or _get(
            a, "details", "membership", "without_defence"
        )
    if isinstance(mem, Mapping):
        tpr1 = _get(mem, "tpr_at_fpr", "0.01")
        out.append(
            "<h3>Membership inference</h3>"
            + _kv(
                [
                    ("attack", mem.get("attack")),
                    ("AUC (chance 0.50)", mem.get("auc")),
                    ("true-positive rate at 1 % false positives (chance 0.01)", tpr1),
                    ("empirical epsilon, lower bound", mem.get("empirical_epsilon")),
                    ("accountant's epsilon", mem.get("accountant_epsilon")),
                    (
                        "largest bound these records can certify",
                        _get(mem, "bound", "max_certifiable"),
                    ),
                    (
                        "members / non-members attacked",
                        f"{_num(mem.get('n_members'))} / {_num(mem.get('n_nonmembers'))}",
                    ),
                ]
            )
        )
        roc = mem.get("roc")
        if isinstance(roc, Mapping):

            def draw(axes: Any) -> None:
                ax = axes[0]
                ax.plot(
                    _nums(roc.get("fpr", [])),
                    _nums(roc.get("tpr", [])),
                    lw=2,
                    label=f"attack (AUC {_num(mem.get('auc'))})",
                )
                ax.plot([0, 1], [0, 1], "--", color="gray", label="chance (no leakage)")
                ax.set_xlabel("false-positive rate")
                ax.set_ylabel("true-positive rate")
                ax.set_xlim(0, 1)
                ax.set_ylim(0, 1.01)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8, loc="lower right")

            out.append(
                _img(
                    _figure(draw, width=4.4, height=3.6),
                    "membership inference ROC",
                    "How well the attacker tells training records from held-out ones; "
                    "the diagonal is guessing.",
                )
            )
    violations = a.get("violations") or []
    if violations:
        out.append(
            _box(
                "warn",
                "<b>Audit violations:</b><ul>"
                + "".join(f"<li>{_esc(v)}</li>" for v in violations)
                + "</ul>",
            )
        )
    elif a.get("summary"):
        out.append(f"<p>{_esc(a['summary'])}</p>")
    errors = a.get("errors")
    if isinstance(errors, Mapping) and errors:
        out.append(
            "<p>Not run: " + "; ".join(f"{_esc(k)} ({_esc(v)})" for k, v in errors.items()) + "</p>"
        )
    return "".join(out)


class _Raw(str):
    """Trusted HTML for a table cell (built by this module from escaped parts)."""


def _config(results: Mapping[str, Any]) -> str:
    c = results.get("config")
    if not isinstance(c, Mapping):
        return ""
    d, t = c.get("data") or {}, c.get("training") or {}
    m, p = c.get("model") or {}, c.get("privacy") or {}
    if d.get("dataset"):
        data = f"built-in '{d.get('dataset')}', {d.get('n_sites')} sites ({d.get('partition')})"
    else:
        sites = d.get("sites") or []
        data = f"{len(sites)} site files, target '{d.get('target')}'"
    hidden = m.get("hidden") if m.get("kind") in ("mlp", "cnn") else None
    rows = [
        ("data", data),
        ("test fraction", d.get("test_fraction")),
        ("model", f"{m.get('kind')}" + (f", hidden {_plain(hidden)}" if hidden else "")),
        ("rounds × local epochs", f"{t.get('rounds')} × {t.get('local_epochs')}"),
        ("batch size, learning rate", f"{t.get('batch_size')}, {t.get('lr')}"),
        ("aggregator", t.get("aggregator")),
        ("server optimizer", t.get("server_optimizer")),
        ("secure aggregation", t.get("secure_aggregation")),
        (
            "privacy",
            p.get("mode")
            if p.get("mode") == "none"
            else f"{p.get('mode')}-level, epsilon {p.get('epsilon')}, delta {p.get('delta')}",
        ),
        ("overrides (--set)", ", ".join(results.get("overrides") or []) or None),
        ("config hash", str(results.get("config_hash", ""))[:16] or None),
        ("privml version", results.get("privml_version")),
    ]
    full = json.dumps(c, indent=1, default=str)
    return _kv(rows) + (
        f"<details><summary>the whole resolved config</summary><pre>{_esc(full)}</pre></details>"
    )


def _notes(results: Mapping[str, Any]) -> str:
    notes = [n for n in results.get("notes") or [] if n]
    if not notes:
        return ""
    return "<ul>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>"


def _other(results: Mapping[str, Any]) -> str:
    out = []
    for key, value in results.items():
        if key in _SHOWN or value is None:
            continue
        title = _esc(key.replace("_", " "))
        if isinstance(value, Mapping):
            body = _kv(
                (str(k), v if not isinstance(v, Mapping | list) else _Raw(_plain(v)))
                for k, v in value.items()
            )
        else:
            body = f"<p>{_plain(value)}</p>"
        out.append(f"<details><summary>{title}</summary>{body}</details>")
    return "".join(out)


_RENDER: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "summary": _summary,
    "sites": _sites,
    "learning": _learning,
    "diagnostics": _diagnostics,
    "privacy": _privacy,
    "encrypted-inference": _encrypted,
    "audit": _audit,
    "config": _config,
    "notes": _notes,
    "other": _other,
}


def render_report(results: Mapping[str, Any]) -> str:
    """The report of one run as a complete HTML document (str).

    Sections whose data is absent or unreadable are left out (a broken section is replaced
    by a one-line note naming it, so one odd value never costs the whole report).
    """
    parts, toc = [], []
    for sid, title in SECTIONS.items():
        try:
            body = _RENDER[sid](results)
        except Exception as exc:  # noqa: BLE001 - report what could not be drawn, keep the rest
            body = _box(
                "warn",
                f"This section could not be drawn ({_esc(type(exc).__name__)}: {_esc(exc)}).",
            )
        if body:
            parts.append(f'<section id="{sid}"><h2>{_esc(title)}</h2>{body}</section>')
            toc.append(f'<a href="#{sid}">{_esc(title)}</a>')
    name = _esc(results.get("name", "run"))
    created = _esc(results.get("created", ""))
    version = _esc(results.get("privml_version", ""))
    secs = _get(results, "timing", "total_seconds")
    took = f", {secs:.1f} s" if isinstance(secs, int | float) else ""
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>privml report: {name}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>privml report: {name}</h1>"
        f"<p class='meta'>created {created} by privml {version}{took}</p>"
        f"<nav>{''.join(toc)}</nav></header>{''.join(parts)}</body></html>\n"
    )
