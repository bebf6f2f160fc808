"""The report as a reader's browser shows it: headless Chromium (Debian's ``chromium``, which
`make test` installs) opens report.html from a real run, and a script in the page checks that
every expected section is there, every image decoded, nothing reaches past the page's width
and nothing was fetched from the network. A screenshot is kept in the test's temporary folder
(``report-<width>.png``) for a person to look at.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import privml
from privml.report import render_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
]  # fmt: skip

CHECK = """
<script>
window.addEventListener('load', () => {
  const width = document.documentElement.clientWidth;
  const wide = [];
  for (const el of document.querySelectorAll('body *')) {
    const r = el.getBoundingClientRect();
    if (r.width > 0 && (r.right > width + 1 || r.left < -1)) {
      wide.push(el.tagName + (el.id ? '#' + el.id : '') + ' ' + Math.round(r.right));
    }
  }
  const imgs = [...document.images].map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0,
    src: i.src.slice(0, 22)}));
  const out = document.createElement('pre');
  out.id = 'privml-check';
  out.textContent = JSON.stringify({
    width, scrollWidth: document.documentElement.scrollWidth, wide: wide.slice(0, 20),
    images: imgs, sections: [...document.querySelectorAll('section')].map(s => s.id),
    external: performance.getEntriesByType('resource').map(e => e.name)
      .filter(n => !n.startsWith('data:')),
  });
  document.body.appendChild(out);
});
</script>
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None and not os.environ.get("CI"),
        reason="chromium is not installed (make test installs it)",
    ),
]


def _browse(html_path: Path, tmp: Path, width: int) -> dict:
    """Opens the page at ``width`` pixels; returns what the check script measured."""
    assert CHROMIUM is not None, "chromium missing in CI: make test installs it (apt-get)"
    probe = tmp / f"probe-{width}.html"
    probe.write_text(html_path.read_text().replace("</body>", CHECK + "</body>"))
    args = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / f'profile-{width}'}",
            f"--window-size={width},900", "--virtual-time-budget=10000"]  # fmt: skip
    dom = subprocess.run([*args, "--dump-dom", probe.as_uri()], capture_output=True,
                         text=True, timeout=300).stdout  # fmt: skip
    start = dom.index('<pre id="privml-check">') + len('<pre id="privml-check">')
    data = json.loads(dom[start : dom.index("</pre>", start)].replace("&quot;", '"')
                      .replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))  # fmt: skip
    shot = tmp / f"report-{width}.png"
    subprocess.run([*[a for a in args if not a.startswith("--window-size")],
                    f"--window-size={width},5000", f"--screenshot={shot}", html_path.as_uri()],
                   capture_output=True, timeout=300)  # fmt: skip
    assert shot.is_file() and shot.stat().st_size > 10_000
    return data


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real runs: the demo (non-private, encrypted inference, quick audit) and a
    sample-level DP run, given a full audit table and an unknown section as well."""
    tmp = tmp_path_factory.mktemp("report")
    demo = privml.run(None, out_dir=tmp / "demo", overrides=["training.rounds=5"])
    dp = privml.run(
        None,
        out_dir=tmp / "dp",
        overrides=["training.rounds=3", "privacy.mode=\"sample\"", "privacy.epsilon=2",
                   f"privacy.ledger=\"{tmp / 'ledger.sqlite'}\"", "inference.encrypted=false"],
    )  # fmt: skip
    res = copy.deepcopy(dp.results)
    res["audit"]["rows"] = [
        {"attack": "membership (loss threshold)", "metric": "AUC", "without_defence": 0.61,
         "with_defence": 0.5, "defence": "sample-level DP (epsilon 2.00)",
         "defence_cost": 0.04, "worse": "higher", "baseline": 0.5, "baseline_kind": "chance",
         "status": "ok", "reason": None},
        {"attack": "evasion (PGD, L-inf 0.05)", "metric": "accuracy under attack",
         "without_defence": 0.31, "with_defence": None, "defence": None, "defence_cost": None,
         "worse": "lower", "baseline": 0.62, "baseline_kind": "majority class",
         "status": "not run", "reason": "a very long reason " * 12},
    ]
    res["some_future_section"] = {"a_long_unbroken_value": "x" * 400, "nested": {"k": [1, 2]}}
    (tmp / "dp" / "results.json").write_text(json.dumps(res, allow_nan=False))
    privml_report = tmp / "dp" / "report.html"
    privml_report.write_text(render_report(res))
    return {"demo": demo.out_dir / "report.html", "dp": privml_report}  # type: ignore[operator]


@pytest.mark.parametrize("width", [1280, 800])
def test_demo_report_renders(reports: dict[str, Path], tmp_path: Path, width: int) -> None:
    data = _browse(reports["demo"], tmp_path, width)
    for section in ("summary", "sites", "learning", "diagnostics", "privacy",
                    "encrypted-inference", "audit", "config"):  # fmt: skip
        assert section in data["sections"], data["sections"]
    assert len(data["images"]) >= 3 and all(i["ok"] for i in data["images"]), data["images"]
    assert all(i["src"].startswith("data:image/png") for i in data["images"])
    assert data["wide"] == [] and data["scrollWidth"] <= data["width"], data
    assert data["external"] == []


def test_private_report_renders(reports: dict[str, Path], tmp_path: Path) -> None:
    data = _browse(reports["dp"], tmp_path, 1024)
    assert {"privacy", "audit", "other"} <= set(data["sections"])
    assert "encrypted-inference" not in data["sections"]
    alts = [i["alt"] for i in data["images"]]
    assert "epsilon per site by round" in alts and "membership inference ROC" in alts
    assert all(i["ok"] for i in data["images"]), data["images"]
    assert data["wide"] == [] and data["scrollWidth"] <= data["width"], data
    text = reports["dp"].read_text()
    assert "sample-level DP" in text and "Released outside the privacy budget" in text
    assert "not run" in text and "some future section" in text
