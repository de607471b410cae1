"""Leaderboard, study listing and the HTML report, on studies built from synthetic trials.

The browser tests open the page in headless Debian `chromium` (skipped with a reason where it is
not installed) with no network: every plot must render, the table must sort and filter, and a
hostile class name must show as text.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from search import report
from search.config import TLSearchError
from search.studies import (
    LEADERBOARD_COLUMNS,
    format_leaderboard,
    get_storage,
    leaderboard,
    list_studies,
    pareto_flags,
    study_summary,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

HOSTILE = "<img src=x onerror=alert(1)>"
SCRIPT_BREAK = "</script><script>alert(2)</script>"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)

DISTRIBUTIONS = {
    # The last choice is a hostile name: the escaping tests give it to one trial.
    "backbone": CategoricalDistribution(["resnet18", "mobilenet_v3_large", "efficientnet_b0", f"net{SCRIPT_BREAK}"]),
    "freeze_depth": CategoricalDistribution([0, 2, "all"]),
    "augmentation": CategoricalDistribution(["none", "flip", "trivialaugment"]),
    "lr": FloatDistribution(1e-5, 1e-2, log=True),
    "batch_size": CategoricalDistribution([16, 32]),
    "image_size": IntDistribution(64, 224, step=32),
    "dropout": FloatDistribution(0.0, 0.5),
}
T0 = 1_750_000_000.0  # a fixed "study start" (unix seconds) so timings are reproducible


def _trial(
    number: int,
    state: TrialState,
    curve: list[float],
    *,
    backbone: str = "resnet18",
    freeze_depth: int | str = 0,
    lr: float = 1e-3,
    worker: str = "host:1",
    start: float = 0.0,
    extra_params: dict | None = None,
    error: str | None = None,
    classes: int = 3,
) -> optuna.trial.FrozenTrial:
    """One synthetic trial with the user_attrs the search engine records."""
    params = {
        "backbone": backbone,
        "freeze_depth": freeze_depth,
        "augmentation": ["none", "flip", "trivialaugment"][number % 3],
        "lr": lr,
        "batch_size": [16, 32][number % 2],
        "image_size": 64 + 32 * (number % 3),
        "dropout": 0.1 * (number % 4),
        **(extra_params or {}),
    }
    epochs = len(curve)
    attrs: dict = {
        "config": {**params, "epochs": 4},
        "epochs_run": epochs,
        "worker": worker,
        "hostname": worker.split(":")[0],
        "started_at": T0 + start,
        "finished_at": T0 + start + 30.0 * max(epochs, 1),
        "train_seconds": 30.0 * epochs,
        "curve": [
            {"epoch": e + 1, "val_acc": v, "val_loss": 1.5 - v, "val_balanced_acc": v - 0.01}
            for e, v in enumerate(curve)
        ],
    }
    if state == TrialState.COMPLETE:
        attrs.update(
            params_total={"resnet18": 11_200_000, "mobilenet_v3_large": 4_200_000}.get(backbone, 4_000_000),
            latency_ms={"resnet18": 9.0, "mobilenet_v3_large": 5.0}.get(backbone, 7.0) + number * 0.1,
            val_loss=1.5 - curve[-1],
            val_balanced_acc=curve[-1] - 0.01,
            confusion_matrix=[[5 if i == j else 1 for j in range(classes)] for i in range(classes)],
        )
    if error:
        attrs["error"] = error
    dists = {k: _distribution(k, v) for k, v in params.items()}
    return create_trial(
        state=state,
        value=curve[-1] if state == TrialState.COMPLETE else None,
        params=params,
        distributions=dists,
        user_attrs=attrs,
        intermediate_values={e + 1: v for e, v in enumerate(curve)},
    )


def _distribution(name: str, value: object) -> optuna.distributions.BaseDistribution:
    """The space's distribution of a param, or a one-choice one for an out-of-space value."""
    dist = DISTRIBUTIONS.get(name)
    try:
        dist.to_internal_repr(value)  # type: ignore[union-attr]
        return dist  # type: ignore[return-value]
    except (AttributeError, ValueError):
        return CategoricalDistribution([value])


def make_study(storage: str, name: str = "demo", *, class_names: list[str] | None = None) -> optuna.Study:
    """A study with 4 COMPLETE, 2 PRUNED (one with a NaN epoch), 1 FAIL and 1 RUNNING trial."""
    study = optuna.create_study(study_name=name, storage=get_storage(storage), direction="maximize")
    study.set_user_attr("dataset", "/data/shapes")
    study.set_user_attr("dataset_fingerprint", "abc123")
    study.set_user_attr("class_names", class_names or ["circle", "square", "triangle"])
    study.set_user_attr("split", "val/ folder")
    study.set_user_attr("settings", {"metric": "val_acc", "mode": "max"})
    C, P, F = TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL
    trials = [
        _trial(0, C, [0.5, 0.6, 0.7, 0.72], backbone="resnet18", lr=3e-4, worker="host:1", start=0),
        _trial(1, P, [0.40], backbone="mobilenet_v3_large", lr=1e-2, worker="host:2", start=0),
        _trial(2, C, [0.6, 0.8, 0.85, 0.90], backbone="mobilenet_v3_large", freeze_depth=2, lr=1e-3,
               worker="host:2", start=40),
        _trial(3, F, [], backbone="efficientnet_b0", lr=5e-3, worker="host:1", start=130,
               error="CUDA out of memory. Tried to allocate 2.00 GiB"),
        _trial(4, P, [float("nan"), 0.55], backbone="resnet18", freeze_depth="all", lr=2e-5,
               worker="host:1", start=170),
        _trial(5, C, [0.55, 0.66, 0.78, 0.80], backbone="efficientnet_b0", freeze_depth="all", lr=6e-4,
               worker="host:2", start=170),
        _trial(6, C, [0.3, 0.35, 0.4, 0.41], backbone="resnet18", freeze_depth=2, lr=1e-5, worker="host:1",
               start=240),
    ]  # fmt: skip
    for t in trials:
        study.add_trial(t)
    study.add_trial(
        create_trial(state=TrialState.RUNNING, params={"backbone": "resnet18"},
                     distributions={"backbone": DISTRIBUTIONS["backbone"]},
                     user_attrs={"worker": "host:2", "started_at": T0 + 300})  # fmt: skip
    )
    return study


@pytest.fixture()
def study(tmp_path: Path) -> optuna.Study:
    return make_study(f"sqlite:///{tmp_path / 'studies' / 'demo.db'}")


# ------------------------------------------------------------------------------------------------
# Leaderboard and listing
# ------------------------------------------------------------------------------------------------


def test_leaderboard_order_states_and_columns(study: optuna.Study) -> None:
    df = leaderboard(study)
    assert list(df.columns[: len(LEADERBOARD_COLUMNS)]) == list(LEADERBOARD_COLUMNS)
    assert "dropout" in df.columns  # other search-space params become columns
    assert df["trial"].tolist() == [2, 5, 0, 6, 4, 1, 3, 7]
    assert df["state"].tolist() == ["COMPLETE"] * 4 + ["PRUNED"] * 2 + ["FAIL", "RUNNING"]
    assert df["rank"].tolist()[:4] == [1, 2, 3, 4]
    assert df["rank"].iloc[4:].isna().all()  # only COMPLETE trials are ranked
    assert df["val_acc"].tolist()[:4] == [0.90, 0.80, 0.72, 0.41]
    # A pruned trial is listed by its best epoch; its NaN epoch is ignored, not ranked best.
    assert df.loc[df["trial"] == 4, "val_acc"].item() == pytest.approx(0.55)
    assert not math.isnan(df["val_acc"].iloc[0])
    best = df.iloc[0]
    assert (best["backbone"], best["freeze_depth"], best["params"]) == ("mobilenet_v3_large", 2, 4_200_000)
    assert best["epochs_run"] == 4 and best["seconds"] == 120 and best["latency_ms"] == pytest.approx(5.2)
    assert best["val_loss"] == pytest.approx(0.6) and best["val_balanced_acc"] == pytest.approx(0.89)
    fail = df[df["state"] == "FAIL"].iloc[0]
    assert "out of memory" in fail["error"] and math.isnan(fail["val_acc"])
    assert set(df.loc[df["state"] != "FAIL", "error"]) == {""}
    assert df.attrs["metric"] == "val_acc"


def test_leaderboard_nan_and_inf_never_first(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'x.db'}", study_name="x", direction="maximize")
    study.add_trial(_trial(0, TrialState.PRUNED, [float("nan")]))
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=float("inf"), params={}, distributions={}))
    study.add_trial(_trial(2, TrialState.COMPLETE, [0.2, 0.3]))
    study.add_trial(_trial(3, TrialState.PRUNED, [0.1]))
    df = leaderboard(study)
    assert df["trial"].tolist() == [2, 1, 3, 0]
    assert df["rank"].tolist()[0] == 1 and df["rank"].iloc[1:].isna().all()


def test_leaderboard_minimize_and_empty(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'm.db'}", study_name="m", direction="minimize")
    assert leaderboard(study).empty and list(leaderboard(study).columns)[:3] == ["rank", "trial", "state"]
    study.set_user_attr("settings", {"metric": "val_loss"})
    for i, v in enumerate([0.9, 0.3, 0.5]):
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=v, params={}, distributions={}))
    df = leaderboard(study)
    assert df["trial"].tolist() == [1, 2, 0] and df["val_loss"].tolist() == [0.3, 0.5, 0.9]


def test_list_studies_counts(tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    make_study(f"sqlite:///{studies / 'demo.db'}")
    optuna.create_study(study_name="empty", storage=f"sqlite:///{studies / 'empty.db'}")
    (studies / "broken.db").write_text("not a database")
    rows = {r["name"]: r for r in list_studies(studies_dir=studies)}
    assert set(rows) == {"demo", "empty", "broken"}
    demo = rows["demo"]
    assert demo["states"] == {"COMPLETE": 4, "PRUNED": 2, "FAIL": 1, "RUNNING": 1, "WAITING": 0}
    assert demo["n_trials"] == 8 and demo["best_trial"] == 2 and demo["best_value"] == 0.9
    assert demo["best_backbone"] == "mobilenet_v3_large" and demo["dataset"] == "/data/shapes"
    assert rows["empty"]["best_value"] is None and rows["empty"]["n_trials"] == 0
    assert rows["broken"]["error"]
    json.dumps(list(rows.values()))  # JSON-ready for `tlsearch studies --json`
    assert [r["name"] for r in list_studies(storage=f"sqlite:///{studies / 'demo.db'}")] == ["demo"]
    assert list_studies(studies_dir=tmp_path / "nowhere") == []


def test_study_summary_and_terminal_table(study: optuna.Study) -> None:
    summary = study_summary(study)
    text = json.dumps(summary, allow_nan=False)  # NaN and <NA> became null
    assert summary["best"]["trial"] == 2 and summary["best"]["value"] == 0.9
    assert summary["states"]["PRUNED"] == 2 and summary["class_names"] == ["circle", "square", "triangle"]
    assert [r["trial"] for r in summary["leaderboard"]] == [2, 5, 0, 6, 4, 1, 3, 7]
    assert "NaN" not in text
    table = format_leaderboard(leaderboard(study), top=3)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["rank", "trial", "state"] and len(lines) == 5
    assert lines[1].split()[:4] == ["1", "2", "COMPLETE", "mobilenet_v3_large"]
    assert "8 trials: 4 complete, 2 pruned, 1 fail, 1 running (showing 3)" in lines[-1]
    full = format_leaderboard(leaderboard(study))
    assert "CUDA out of memory" in full
    with pytest.raises(TLSearchError, match="--top"):
        format_leaderboard(leaderboard(study), top=0)


def test_terminal_table_strips_control_characters(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'c.db'}", study_name="c")
    study.add_trial(_trial(0, TrialState.FAIL, [], error="boom \x1b[2J\x1b]0;owned\x07"))
    assert "\x1b" not in format_leaderboard(leaderboard(study))


# ------------------------------------------------------------------------------------------------
# Figures from plain data, and the page
# ------------------------------------------------------------------------------------------------


def test_figures_from_plain_data(study: optuna.Study) -> None:
    data = report.collect(study)
    built = dict((p.key, f) for p, f in report.build_figures(data))
    assert set(built) == {p.key for p in report.PLOTS}
    notes = {k: v for k, v in built.items() if isinstance(v, str)}
    assert not notes, notes
    assert isinstance(data.importances, dict) and set(data.importances) <= set(DISTRIBUTIONS)
    assert pareto_flags([1, 2, 3, 2], [0.5, 0.7, 0.6, 0.4], maximize=True) == [True, True, False, False]
    # Pruned curves are dashed and end in a cross.
    pruned = [t for t in built["curves"].data if t.line.dash == "dash"]
    assert pruned and all(list(t.marker.size)[-1] > 0 for t in pruned)


def test_figures_say_not_enough_data(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'e.db'}", study_name="e", direction="maximize")
    study.add_trial(_trial(0, TrialState.FAIL, [], error="boom"))
    data = report.collect(study)
    built = dict((p.key, f) for p, f in report.build_figures(data))
    assert all(isinstance(v, str) and v.startswith("Not enough data") for k, v in built.items() if k != "timeline")
    assert "2 complete trials" in built["importances"]
    path = report.write_report(study, out_dir=tmp_path / "r")
    assert "Not enough data" in path.read_text()


def test_write_report_files(study: optuna.Study, tmp_path: Path) -> None:
    path = report.write_report("demo", studies_dir=tmp_path / "studies", reports_dir=tmp_path / "reports")
    assert path == tmp_path / "reports" / "demo" / "index.html"
    rows = list(csv.DictReader((path.parent / "leaderboard.csv").open()))
    assert [r["trial"] for r in rows] == ["2", "5", "0", "6", "4", "1", "3", "7"]
    assert rows[0]["rank"] == "1" and rows[4]["rank"] == ""
    with pytest.raises(TLSearchError, match="no study named"):
        report.write_report("nope", studies_dir=tmp_path / "studies", reports_dir=tmp_path / "reports")


def _external_loads(page: str) -> list[str]:
    """src=/href= attributes and CSS url()s that point outside the file."""
    return re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//[^"'\s>]*|url\(\s*["']?(?:https?:)?//""", page)


def _hostile_study(tmp_path: Path) -> optuna.Study:
    study = make_study(f"sqlite:///{tmp_path / 'h.db'}", name=f"evil{SCRIPT_BREAK}",
                       class_names=["cat", HOSTILE, f"dog{SCRIPT_BREAK}"])  # fmt: skip
    study.set_user_attr("dataset", f"/data/{HOSTILE}")
    study.add_trial(
        _trial(8, TrialState.COMPLETE, [0.1, 0.2], backbone=f"net{SCRIPT_BREAK}", worker=f"w{HOSTILE}",
               start=400, extra_params={"note": HOSTILE}, error=None)  # fmt: skip
    )
    study.add_trial(_trial(9, TrialState.FAIL, [], error=f"{HOSTILE} {SCRIPT_BREAK}", start=420))
    return study


def test_page_is_self_contained_and_escaped(tmp_path: Path) -> None:
    import plotly.offline

    study = _hostile_study(tmp_path)
    with pytest.raises(TLSearchError, match="study name"):  # the name cannot become a folder
        report.write_report(study, reports_dir=tmp_path / "reports")
    page = report.write_report(study, out_dir=tmp_path / "r").read_text()
    plotly_js = plotly.offline.get_plotlyjs()
    assert page.count(plotly_js[:2000]) == 1 and page.count(plotly_js[-2000:]) == 1
    # Outside plotly.js itself (which names map-tile URLs it would only use for map traces),
    # nothing refers to the network; the CSP forbids any load anyway.
    outside = page.replace(plotly_js, "")
    assert _external_loads(outside) == []
    assert "cdn" not in outside.lower() and "fonts.googleapis" not in outside
    assert "default-src &#x27;none&#x27;" in page
    # Hostile strings appear only escaped: no tag, no script break.
    assert HOSTILE not in outside and "<img" not in outside
    assert outside.count("</script>") == 3  # plotly.js, the JSON block, the page's script
    assert html_escape(HOSTILE) in outside
    blob = re.search(r'<script type="application/json" id="tl-figures">(.*?)</script>', page, re.S).group(1)
    assert "<" not in blob and ">" not in blob and "&" not in blob
    figures = json.loads(blob)["figures"]
    assert len(figures) == len(report.PLOTS)
    labels = json.dumps(figures)
    assert HOSTILE not in labels and html_escape(HOSTILE) in labels  # plot labels escaped too


def test_page_inlines_the_package_files_and_allows_only_its_scripts(study: optuna.Study, tmp_path: Path) -> None:
    import base64
    import hashlib
    import html
    from importlib.resources import files

    page = report.write_report(study, out_dir=tmp_path / "r").read_text()
    package = files("search.report")  # page.css and app.js ship inside the package, not as strings
    css, app_js = (package.joinpath(n).read_text(encoding="utf-8") for n in ("page.css", "app.js"))
    assert css.strip() and app_js.strip()
    assert f"<style>{css}</style>" in page
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)  # plotly.js, then the page's script
    assert len(scripts) == 2 and scripts[1] == app_js
    # The CSP lets exactly these two scripts run: its hashes are of the text as inlined.
    csp = html.unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page).group(1))
    allowed = set(re.search(r"script-src ([^;]*);", csp).group(1).split())
    digest = [base64.b64encode(hashlib.sha256(s.encode("utf-8")).digest()).decode() for s in scripts]
    assert allowed == {f"'sha256-{d}'" for d in digest}


def test_confusion_matrix_is_the_best_trials_last_epoch(study: optuna.Study) -> None:
    data = report.collect(study)
    best = next(t for t in study.get_trials() if t.number == 2)  # val_acc 0.90 at its last epoch
    assert data.best_trial == 2 and data.confusion["trial"] == 2
    assert data.confusion["matrix"] == best.user_attrs["confusion_matrix"]
    assert data.confusion["class_names"] == ["circle", "square", "triangle"]
    about = next(p.about for p in report.PLOTS if p.key == "confusion")
    assert about.startswith("Best trial's last epoch on the validation set")


def html_escape(s: str) -> str:
    import html

    return html.escape(s, quote=True)


# ------------------------------------------------------------------------------------------------
# In a real browser
# ------------------------------------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian chromium (apt-get install -y chromium); /usr/bin/chromium not found"
)


def _chromium(tmp_path: Path, url: str, *extra: str) -> str:
    """Runs headless chromium with the network off and returns its stdout."""
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-extensions",
        "--no-proxy-server",
        # Network off: every host name resolves to nothing.
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=8000",
        "--window-size=1300,900",
        *extra,
        url,
    ]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, "LANG": "C.UTF-8"})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


class _Dom(HTMLParser):
    """Collects what the browser tests look at in a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.status: dict[str, str] = {}
        self.rows: list[dict[str, str | None]] = []
        self.plot_divs: dict[str, int] = {}
        self.imgs: list[dict[str, str | None]] = []
        self._plot: str | None = None
        self._depth = 0
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id") == "tl-status":
            self.status = {k: v or "" for k, v in a.items()}
        if tag == "tr" and "data-trial" in a:
            self.rows.append(a)
        if tag == "img":
            self.imgs.append(a)
        if tag == "div" and a.get("data-plot"):
            self._plot = a["data-plot"]
            self.plot_divs[self._plot] = 0
        if self._plot and "main-svg" in (a.get("class") or "").split():
            self.plot_divs[self._plot] += 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@needs_chromium
def test_browser_renders_every_plot_sorts_and_escapes(tmp_path: Path) -> None:
    study = _hostile_study(tmp_path)
    page = report.write_report(study, out_dir=tmp_path / "r")
    dom = _Dom()
    dom.feed(_chromium(tmp_path, page.as_uri() + "#sort=val_acc&dir=asc&filter=", "--dump-dom"))
    assert dom.status.get("data-done") == "1", dom.status
    assert dom.status["data-errors"] == "" and dom.status["data-violations"] == ""
    assert int(dom.status["data-rendered"]) == int(dom.status["data-expected"]) == len(report.PLOTS)
    assert set(dom.plot_divs) == {p.key for p in report.PLOTS}
    assert all(n > 0 for n in dom.plot_divs.values()), dom.plot_divs
    # Sorted by val_acc ascending via the hash; trials without a value stay last.
    order = [int(r["data-trial"]) for r in dom.rows]
    assert order == [8, 1, 6, 4, 0, 5, 2, 3, 9, 7]
    # The hostile strings are text in the DOM, never elements.
    assert not [i for i in dom.imgs if i.get("src") == "x"]
    text = "".join(dom.text)
    assert HOSTILE in text and f"dog{SCRIPT_BREAK}" in text


@needs_chromium
def test_browser_filter_and_sort_descending(tmp_path: Path) -> None:
    page = report.write_report(make_study(f"sqlite:///{tmp_path / 'd.db'}"), out_dir=tmp_path / "r")
    dom = _Dom()
    dom.feed(_chromium(tmp_path, page.as_uri() + "#sort=trial&dir=desc&filter=pruned", "--dump-dom"))
    visible = [int(r["data-trial"]) for r in dom.rows if "hidden" not in r]
    assert visible == [4, 1]
    assert [int(r["data-trial"]) for r in dom.rows] == [7, 6, 5, 4, 3, 2, 1, 0]
    assert "2 of 8 trials" in "".join(dom.text)


@needs_chromium
def test_browser_screenshot(tmp_path: Path) -> None:
    page = report.write_report(make_study(f"sqlite:///{tmp_path / 's.db'}"), out_dir=tmp_path / "r")
    shot = Path(os.environ.get("TLSEARCH_REPORT_SHOT", tmp_path / "report.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    _chromium(tmp_path, page.as_uri(), f"--screenshot={shot}", "--window-size=1300,5200")
    assert shot.stat().st_size > 50_000  # a rendered page, not a blank one


def test_cost_figure_marks_the_front_in_the_study_direction() -> None:
    import pandas as pd

    board = pd.DataFrame({
        "trial": [0, 1, 2, 3], "state": ["COMPLETE"] * 4, "backbone": ["a"] * 4,
        "val_loss": [0.3, 0.2, 0.9, 0.25], "params": [10e6, 20e6, 5e6, 30e6], "latency_ms": [None] * 4,
    })
    front = {tuple(zip(t.x, t.y)) for t in report.cost_figure(board, metric="val_loss", maximize=False).data
             if t.name == "Pareto front"}
    assert front == {((5.0, 0.9), (10.0, 0.3), (20.0, 0.2))}
    front = {tuple(zip(t.x, t.y)) for t in report.cost_figure(board, metric="val_loss", maximize=True).data
             if t.name == "Pareto front"}
    assert front == {((5.0, 0.9),)}


# ------------------------------------------------------------------------------------------------
# The ensembles section (from the summary `tlsearch ensemble` leaves in the study's folder)
# ------------------------------------------------------------------------------------------------


def _bins(pairs: list[tuple[float, float, int]]) -> list[dict]:
    """Reliability bins as `search.ensemble.reliability_bins` writes them: 15 bins, most of them empty."""
    out = [{"low": i / 15, "high": (i + 1) / 15, "images": 0, "confidence": None, "accuracy": None} for i in range(15)]
    for conf, acc, n in pairs:
        out[min(14, int(conf * 15))].update(images=n, confidence=conf, accuracy=acc)
    return out


def ensemble_summary(name: str = "ensemble") -> dict:
    def row(cname: str, kind: str, val: float, held: float, ms: float, shipped: bool = False) -> dict:
        return {"name": cname, "kind": kind, "shipped": shipped, "members": [], "tta": False, "temperature": 0.8,
                "val_score": val, "heldout_score": held, "heldout_accuracy": held, "val_ece_before": 0.1,
                "val_ece_after": 0.05, "heldout_ece_before": 0.12, "heldout_ece_after": 0.04, "latency_ms": ms,
                "size_mb": 10.0}

    return {"study": "demo", "metric": "val_acc", "heldout": {"kind": "test", "images": 40, "optimistic": False},
            "val_images": 50, "shipped": name,
            "candidates": [row("best single", "single", 0.90, 0.85, 5.0),
                           row("soup mobilenet_v3_large", "soup", 0.91, 0.86, 5.1),
                           row(name, "ensemble", 0.94, 0.88, 14.0, shipped=True)],
            "reliability": {"before": _bins([(0.7, 0.9, 10), (0.95, 1.0, 30)]),
                            "after": _bins([(0.8, 0.85, 15), (0.97, 0.96, 25)])}}


def test_ensembles_section_appears_when_the_study_folder_has_a_summary(tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    study = make_study(f"sqlite:///{studies / 'demo.db'}")
    page = report.write_report("demo", studies_dir=studies, reports_dir=tmp_path / "reports").read_text()
    assert 'id="ensembles"' not in page and 'id="calibration"' not in page  # no summary: no section
    summary_path = studies / "demo" / "ensemble.json"
    summary_path.parent.mkdir(parents=True)
    summary_path.write_text(json.dumps(ensemble_summary(HOSTILE)))
    built = {p.key: f for p, f in report.build_figures(report.collect(study, studies_dir=studies))}
    assert {p.key for p in report.ENSEMBLE_PLOTS} <= set(built)
    ens, cal = built["ensembles"], built["calibration"]
    assert not isinstance(ens, str) and not isinstance(cal, str), (ens, cal)
    by_name = {t.name: t for t in ens.data}
    assert list(by_name["ensemble (val)"].y) == [0.94] and list(by_name["ensemble (held out)"].y) == [0.88]
    assert list(by_name["ensemble (val)"].marker.symbol) == ["star"]  # the shipped one
    assert len(by_name["trials (val)"].x) == 4  # the complete trials with a latency, next to the candidates
    curves = {t.name.split(" (")[0]: t for t in cal.data}
    assert list(curves["before temperature"].x) == [0.7, 0.95]  # empty bins are not drawn
    assert "ECE 0.040" in next(t.name for t in cal.data if t.name.startswith("after"))
    page = report.write_report("demo", studies_dir=studies, reports_dir=tmp_path / "reports").read_text()
    assert 'id="ensembles"' in page and 'id="calibration"' in page
    assert HOSTILE not in page  # a user string from the summary is escaped like any other
    summary_path.write_text("{ not json")  # an unreadable summary costs the section, never the report
    page = report.write_report("demo", studies_dir=studies, reports_dir=tmp_path / "reports").read_text()
    assert 'id="ensembles"' not in page
