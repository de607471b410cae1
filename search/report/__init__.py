"""The HTML report of a study: one self-contained page that works offline.

Compute, then render, in three steps:

1. data (`_data`): `collect(study)` turns the study into plain tables (`ReportData`: the
   leaderboard from `studies.leaderboard`, one row per trial with its timing, the per-epoch curves,
   parameter importances, the best trial's confusion matrix at its last epoch, and the summary
   `tlsearch ensemble` left in studies/<study>/ensemble.json, when there is one; the error gallery
   from `_gallery`: the validation images the best kept trials get wrong, read from the logits each
   kept beside its checkpoint, as small embedded JPEGs; the last `tlsearch check --labels` of the
   study's dataset, when there is one);
2. figures (`_figures`, drawing with `_figures_search` and `_figures_trials`, sharing `_plotting`):
   one function per plot (`history_figure`, `backbone_figure`, ...) builds a plotly Figure from
   that plain data, or raises `NotEnoughData` with a short reason the page shows instead;
3. page (`_page`, with the package files `page.html`, `page.css` and `app.js`): `render_page`
   draws the header, the leaderboard table and the figures into one HTML file; `write_report`
   runs the three steps and writes it.

The page loads nothing from outside: plotly.js is inlined once, there are no fonts, no CDN and no
fetch, and a Content-Security-Policy forbids any load (only the page's own two scripts, by hash,
may run; images are data: URIs). Every user string (study name, class names, paths, param values, errors) is escaped with
`html.escape`, inside plot labels too (the gallery's file and class names reach
the page as JSON data and are set as text by app.js, never as markup); JSON inside <script> has `<`, `>` and `&` escaped.

This is the only package that imports plotly; the CLI imports it only when a report is written.
"""

from search.report._data import ReportData, collect, param_importances, read_ensemble
from search.report._figures import ENSEMBLE_PLOTS, PLOTS, Plot, build_figures
from search.report._figures_ensemble import calibration_figure, ensemble_figure
from search.report._figures_search import backbone_figure, history_figure, importance_figure, parallel_figure
from search.report._figures_trials import confusion_figure, cost_figure, curves_figure, timeline_figure
from search.report._page import render_page, write_report
from search.report._plotting import STATE_COLOURS, NotEnoughData

__all__ = [
    "ENSEMBLE_PLOTS",
    "PLOTS",
    "STATE_COLOURS",
    "NotEnoughData",
    "Plot",
    "ReportData",
    "backbone_figure",
    "build_figures",
    "calibration_figure",
    "collect",
    "confusion_figure",
    "cost_figure",
    "curves_figure",
    "ensemble_figure",
    "history_figure",
    "importance_figure",
    "param_importances",
    "parallel_figure",
    "read_ensemble",
    "render_page",
    "timeline_figure",
    "write_report",
]
