"""Step 3 of the report: the page. `render_page` draws the header, the leaderboard table and the
figures (or their notes) into one self-contained HTML file; `write_report` runs all three steps
and writes `index.html`, `leaderboard.csv` and `per_class.csv` (the best trial's per-class results).

The page's template, styles and script are files of this package (`page.html`, `page.css`,
`app.js`), inlined into every page: it loads nothing. The Content-Security-Policy lets only the
page's two scripts (plotly.js and app.js) run, by the hash of their text as inlined here.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import math
import time
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import plotly.graph_objects as go
import plotly.offline
from plotly.utils import PlotlyJSONEncoder

from search.config import TLSearchError, atomic_write_text, check_study_name
from search.report._data import ReportData, collect
from search.report._figures import Plot, build_figures
from search.report._plotting import STATE_COLOURS, _fmt
from search.metrics import PER_CLASS_COLUMNS
from search.studies import load_study

if TYPE_CHECKING:
    import optuna

# plotly.js options: no logo link, no cloud buttons, and no MathJax typesetting (it would look for
# a MathJax script; we never load one).
_PLOTLY_CONFIG = {
    "displaylogo": False,
    "showLink": False,
    "showSendToCloud": False,
    "showEditInChartStudio": False,
    "typesetMath": False,
    "responsive": True,
}


@functools.cache
def _asset(name: str) -> str:
    """A file shipped in this package (page.html, page.css, app.js), read once."""
    return files("search.report").joinpath(name).read_text(encoding="utf-8")


def write_report(
    study_or_name: "optuna.Study | str",
    *,
    out_dir: str | Path | None = None,
    studies_dir: str | Path = "studies",
    storage: str | None = None,
    reports_dir: str | Path = "reports",
) -> Path:
    """Writes the report of a study: `index.html` (self-contained), `leaderboard.csv` and
    `per_class.csv` (the best trial's precision, recall, F1 and support per class, at its last
    epoch; only the header while there is no best trial).

    Args:
        study_or_name: an Optuna study, or the name of one to open.
        out_dir: the folder to write; None: `reports_dir/<study name>/`.
        studies_dir: where default SQLite studies live (when a name is given), and the study's
            folder with its ensemble summary (the ensembles section, when there is one).
        storage: the storage URL (when a name is given); None: `studies_dir/<name>.db`.
        reports_dir: the parent of the default out_dir.

    Returns:
        The path of index.html. Both files are replaced atomically, so a browser or a reader
        never sees half a page while a running search refreshes it.
    """
    if isinstance(study_or_name, str):
        study = load_study(study_or_name, storage=storage, studies_dir=studies_dir)
    else:
        study = study_or_name
    if out_dir is None:
        # The name becomes a folder: refuse names that could escape reports_dir.
        out = Path(reports_dir, check_study_name(study.study_name))
    else:
        out = Path(out_dir)
    data = collect(study, studies_dir=studies_dir)
    page = render_page(data, build_figures(data))
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "leaderboard.csv", data.board.to_csv(index=False))
        atomic_write_text(out / "per_class.csv", per_class_frame(data).to_csv(index=False))
        atomic_write_text(out / "index.html", page)
    except OSError as e:
        raise TLSearchError(f"cannot write the report to {out}: {e.strerror or e}") from None
    return out / "index.html"


def per_class_frame(data: ReportData) -> pd.DataFrame:
    """The best trial's per-class results as a table: trial, class, precision, recall, f1, support.

    Args:
        data: the report data.

    Returns:
        One row per class in class-index order (no rows while there is no best trial).
    """
    columns = ["trial", *PER_CLASS_COLUMNS]
    rows = [{"trial": data.best_trial, **{c: r.get(c) for c in PER_CLASS_COLUMNS}} for r in data.per_class or ()]
    return pd.DataFrame(rows, columns=columns)


def _script_json(obj: Any) -> str:
    """JSON that is safe inside <script>: no `</script>`, `<!--` or `&` can appear in it."""
    # PlotlyJSONEncoder writes NaN and inf as null (plain JSON has neither).
    text = json.dumps(obj, cls=PlotlyJSONEncoder, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _csp_hash(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode() + "'"


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def render_page(data: ReportData, figures: list[tuple[Plot, go.Figure | str]]) -> str:
    """Draws the page: header, leaderboard table, plots (or their notes).

    Args:
        data: the report data.
        figures: from `build_figures`.

    Returns:
        The HTML text of the self-contained page.
    """
    plotly_js = plotly.offline.get_plotlyjs().replace("</script", "<\\/script")
    app_js = _asset("app.js")
    specs = {}
    sections = []
    for plot, fig in figures:
        div = f"plot-{plot.key}"
        if isinstance(fig, go.Figure):
            specs[div] = _figure_json(fig)
            body = f'<div class="plot" id="{div}" data-plot="{plot.key}"></div>'
        else:
            body = f'<p class="note" data-plot-note="{plot.key}">{_e(fig)}</p>'
        sections.append(
            f'<section class="card" id="{plot.key}"><h2>{_e(plot.title)}</h2>'
            f'<p class="about">{_e(plot.about)}</p>{body}</section>'
        )
    per_class = _per_class_html(data)
    at = next((i for i, (plot, _) in enumerate(figures) if plot.key == "confusion"), len(sections))
    sections.insert(at, per_class)  # read beside the confusion matrix
    # The images the model gets wrong and the labels that look wrong follow the confusion matrix.
    at = next((i for i, sec in enumerate(sections) if 'id="confusion"' in sec), len(sections) - 1) + 1
    sections[at:at] = [_gallery_html(data), *([_label_issues_html(data)] if data.label_issues else [])]
    gallery = data.gallery if isinstance(data.gallery, dict) else None
    payload = _script_json({"config": _PLOTLY_CONFIG, "figures": specs, "gallery": gallery})
    # Only these two scripts may run (CSP by hash): no injected handler or script can, and no
    # request can leave the page (default-src 'none').
    csp = (
        "default-src 'none'; "
        f"script-src {_csp_hash(plotly_js)} {_csp_hash(app_js)}; "
        "style-src 'unsafe-inline'; img-src data: blob:; font-src data:; "
        "base-uri 'none'; form-action 'none'"
    )
    # page.html is a str.format template: its only braces are the {fields} filled here.
    return _asset("page.html").format(
        title=_e(f"tlsearch report: {data.name}"),
        csp=_e(csp),
        css=_asset("page.css"),
        header=_header_html(data),
        table=_table_html(data.board),
        sections="\n".join(sections),
        plotly_js=plotly_js,
        payload=payload,
        app_js=app_js,
        n_plots=len(specs),
    )


def _figure_json(fig: go.Figure) -> dict:
    spec = fig.to_plotly_json()
    return {"data": spec.get("data", []), "layout": spec.get("layout", {})}


def _header_html(data: ReportData) -> str:
    attrs = data.attrs
    counts = data.board["state"].value_counts().to_dict()
    badges = " ".join(
        f'<span class="badge s-{s}">{counts.get(s, 0)} {s.lower()}</span>'
        for s in STATE_COLOURS
        if counts.get(s) or s in ("COMPLETE", "PRUNED", "FAIL")
    )
    classes = attrs.get("class_names") or []
    class_list = ", ".join(f"<code>{_e(c)}</code>" for c in classes) if classes else "not recorded"
    rows = [
        ("Dataset", f"<code>{_e(attrs.get('dataset', 'not recorded'))}</code>"),
        ("Classes", f"{len(classes)}: {class_list}" if classes else class_list),
        ("Objective", f"{'maximise' if data.maximize else 'minimise'} <code>{_e(data.metric)}</code>"),
        ("Trials", f"{len(data.board)} &nbsp; {badges}"),
    ]
    if attrs.get("split"):
        rows.append(("Split", _e(attrs["split"])))
    if attrs.get("dataset_fingerprint"):
        rows.append(("Fingerprint", f"<code>{_e(attrs['dataset_fingerprint'])}</code>"))
    generated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(data.generated))
    rows.append(("Generated", _e(generated)))
    meta = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return (
        f'<header><h1>Study <span class="name">{_e(data.name)}</span></h1>'
        f'<table class="meta">{meta}</table>{_best_html(data)}</header>'
    )


def _best_html(data: ReportData) -> str:
    if data.best_trial is None:
        return '<div class="best none">No complete trial yet: no best trial.</div>'
    r = data.board[data.board["trial"] == data.best_trial].iloc[0]
    parts = [f'<b>{_e(data.metric)} {_e(_fmt(float(r[data.metric])))}</b>']
    for col, label in (("backbone", "backbone"), ("freeze_depth", "freeze depth"), ("augmentation", "augmentation"),
                       ("lr", "lr"), ("batch_size", "batch"), ("image_size", "image"), ("epochs_run", "epochs")):  # fmt: skip
        if _present(r[col]):
            parts.append(f"{label} <code>{_e(_fmt(r[col]))}</code>")
    if _present(r["params"]):
        parts.append(f"{float(r['params']) / 1e6:.1f}M params")
    if _present(r["latency_ms"]):
        parts.append(f"{float(r['latency_ms']):.1f} ms/image")
    return f'<div class="best">Best: trial #{int(r["trial"])} &middot; ' + " &middot; ".join(parts) + "</div>"


def _present(v: Any) -> bool:
    if v is None or v is pd.NA:
        return False
    return not (isinstance(v, float) and math.isnan(v))


# How each column is shown in the table (the CSV keeps the raw values).
def _cell(col: str, v: Any) -> tuple[str, str, str]:
    """Returns (sort key, kind "n" or "s", display text) of one table cell."""
    if not _present(v) or v == "":
        return "", "s", "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "item"):
        return str(v), "s", str(v)
    v = v.item() if hasattr(v, "item") else v
    if isinstance(v, float) and not math.isfinite(v):
        return "", "s", str(v)
    if col == "params":
        text = f"{v / 1e6:.2f}M"
    elif col == "lr" or (isinstance(v, float) and v != 0 and abs(v) < 1e-3):
        text = f"{v:.2e}"
    elif col in ("latency_ms",):
        text = f"{v:.1f}"
    elif col == "seconds":
        text = f"{v:.0f}"
    elif isinstance(v, float):
        text = f"{v:.4f}" if col.startswith(("val_", "train_")) else f"{v:.4g}"
    else:
        text = str(v)
    return repr(float(v)), "n", text


def _per_class_html(data: ReportData) -> str:
    """The best trial's per-class table (sortable by any column), or a note while there is none."""
    about = ("Best trial's last epoch on the validation set: how well each class is found (recall) and how "
             "trustworthy its predictions are (precision). Click a column header to sort. Also in "
             "<code>per_class.csv</code> beside this page.")
    if not data.per_class:
        body = '<p class="note">No per-class results: there is no best trial yet, or it recorded none.</p>'
    else:
        frame = per_class_frame(data).drop(columns=["trial"])
        head = "".join(f'<th data-col="{_e(c)}" tabindex="0" scope="col">{_e(c)}</th>' for c in frame.columns)
        rows = []
        for r in frame.to_dict("records"):
            cells = []
            for c in frame.columns:
                key, kind, text = _cell(c, r[c])
                if c in ("precision", "recall", "f1") and kind == "n":
                    text = f"{float(r[c]):.3f}"
                cells.append(f'<td data-v="{_e(key)}" data-t="{kind}">{_e(text)}</td>')
            rows.append("<tr>" + "".join(cells) + "</tr>")
        body = (f'<div class="tablewrap"><table id="per-class" class="sortable"><thead><tr>{head}</tr></thead>'
                f'<tbody>{"".join(rows)}</tbody></table></div>')
    trial = f" (trial #{data.best_trial})" if data.best_trial is not None and data.per_class else ""
    return (f'<section class="card" id="per-class-section"><h2>Per-class results{trial}</h2>'
            f'<p class="about">{about}</p>{body}</section>')


def _table_html(board: pd.DataFrame) -> str:
    cols = list(board.columns)
    head = "".join(f'<th data-col="{_e(c)}" tabindex="0" scope="col">{_e(c)}</th>' for c in cols)
    body = []
    for r in board.to_dict("records"):
        cells = []
        for c in cols:
            key, kind, text = _cell(c, r[c])
            cls = f' class="badge s-{_e(text)}"' if c == "state" else ""
            if c == "error" and text != "–":
                shown = text if len(text) <= 80 else text[:77] + "..."
                cells.append(f'<td data-v="{_e(key)}" data-t="s" title="{_e(text)}" class="err">{_e(shown)}</td>')
            else:
                cells.append(f'<td data-v="{_e(key)}" data-t="{kind}"><span{cls}>{_e(text)}</span></td>')
        body.append(f'<tr data-trial="{_e(r["trial"])}" data-state="{_e(r["state"])}">' + "".join(cells) + "</tr>")
    return (
        '<div class="controls"><label>Filter <input id="filter" type="search" '
        'placeholder="e.g. resnet, pruned, trivialaugment" autocomplete="off"></label>'
        f'<span id="shown">{len(board)} of {len(board)} trials</span>'
        '<span class="hint">Click a column header to sort.</span></div>'
        f'<div class="tablewrap"><table id="leaderboard"><thead><tr>{head}</tr></thead>'
        f'<tbody>{"".join(body)}</tbody></table></div>'
    )


def _gallery_html(data: ReportData) -> str:
    """The error gallery's frame; app.js fills it from the JSON block (names go in as text only)."""
    about = ("The validation images the trial gets wrong at its last epoch, highest loss first, each with its "
             "true class, the predicted class and that prediction's probability; above them the most "
             "confused pairs (true &rarr; predicted): click one to see its images. From the validation "
             "predictions the trial kept with its checkpoint.")
    if isinstance(data.gallery, dict):
        n = len(data.gallery["images"])
        body = ('<div class="controls"><label>Trial <select id="gallery-trial"></select></label>'
                '<span id="gallery-shown"></span></div><div id="gallery-pairs" class="pairs"></div>'
                f'<div id="gallery-grid" class="gallery" data-images="{n}"></div>')
    else:
        why = data.gallery if isinstance(data.gallery, str) else "not computed for this page"
        body = f'<p class="note" data-gallery-note="1">No error gallery: {_e(why)}.</p>'
    return (f'<section class="card" id="gallery-section"><h2>What the model gets wrong</h2>'
            f'<p class="about">{about}</p>{body}</section>')


# Label issues with a thumbnail in the report (the rest are in `tlsearch check --labels --json`).
LABEL_ISSUES_SHOWN = 24


def _label_issues_html(data: ReportData) -> str:
    """The last `tlsearch check --labels` of the study's dataset: its ranked suspects."""
    from search.report._gallery import thumbnail

    li = data.label_issues or {}
    issues = li.get("issues") or []
    about = (f"From <code>tlsearch check DATA --labels</code> on this dataset (same files and split): "
             f"{len(issues)} of {_e(li.get('images'))} train and val images whose given label looks wrong "
             f"(out-of-fold linear probe on <code>{_e(li.get('backbone'))}</code> features, "
             f"{_e(li.get('folds'))} folds, accuracy {_e(li.get('probe_accuracy'))}; cleanlab), most likely first.")
    rows = []
    root = data.attrs.get("dataset") or ""
    for r in issues[:LABEL_ISSUES_SHOWN]:
        src = thumbnail(str(r.get("path", "")), side=72)
        img = f'<img class="thumb" alt="" src="{_e(src)}">' if src else ""
        name = str(r.get("path", ""))
        if root and name.startswith(str(root)):
            name = name[len(str(root)):].lstrip("/\\")
        rows.append(f'<tr><td data-t="n">{_e(r.get("rank"))}</td><td>{img}</td><td>{_e(r.get("split"))}</td>'
                    f'<td class="fname">{_e(name)}</td><td>{_e(r.get("given"))} ({_e(r.get("given_prob"))})</td>'
                    f'<td>{_e(r.get("suggested"))} ({_e(r.get("suggested_prob"))})</td></tr>')
    table = ('<div class="tablewrap"><table id="label-issues"><thead><tr><th>rank</th><th></th><th>split</th>'
             '<th>file</th><th>given (prob.)</th><th>suggested (prob.)</th></tr></thead>'
             f'<tbody>{"".join(rows)}</tbody></table></div>') if rows else '<p class="note">No label issue found.</p>'
    return (f'<section class="card" id="label-issues-section"><h2>Labels that look wrong</h2>'
            f'<p class="about">{about}</p>{table}</section>')
