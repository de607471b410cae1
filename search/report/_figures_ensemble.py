"""Figures of `tlsearch ensemble`'s summary: its candidates on the score x latency plane next to the
trials, and the shipped model's reliability diagram before and after temperature scaling. Each takes
plain data (the summary dict, the leaderboard) and returns a plotly Figure, or raises `NotEnoughData`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from search.report._plotting import (
    _BEST_COLOUR,
    STATE_COLOURS,
    NotEnoughData,
    _complete,
    _layout,
    _t,
)

_KIND_COLOURS = {"single": "#2b6cb0", "soup": "#805ad5", "ensemble": "#dd6b20"}


def ensemble_figure(board: pd.DataFrame, summary: dict[str, Any], *, metric: str) -> go.Figure:
    """Score against latency: the complete trials, and every ensemble candidate at its validation
    score (filled; where it was chosen) and its held-out score (open; what it is worth), the shipped
    one starred.

    Args:
        board: the leaderboard.
        summary: what `build_ensemble` returned (studies/<study>/ensemble.json).
        metric: the study's objective (the trials' axis).

    Returns:
        The figure.
    """
    rows = [c for c in summary.get("candidates", []) if c.get("latency_ms") is not None]
    if not rows:
        raise NotEnoughData("the ensemble summary has no candidate with a latency")
    held = summary.get("heldout") or {}
    where = "test/" if held.get("kind") == "test" else "cross-fitted, optimistic"
    fig = go.Figure()
    trials = _complete(board, metric)
    trials = trials[trials["latency_ms"].notna()]
    if len(trials):
        fig.add_trace(go.Scatter(
            x=trials["latency_ms"].astype(float), y=trials[metric].astype(float), mode="markers", name="trials (val)",
            text=[f"trial {int(t)} ({_t(b)})" for t, b in zip(trials["trial"], trials["backbone"])],
            marker={"color": STATE_COLOURS["COMPLETE"], "size": 7, "opacity": 0.45},
            hovertemplate="%{text}<br>%{x:.1f} ms, %{y:.4f}<extra></extra>"))
    for kind, colour in _KIND_COLOURS.items():
        part = [c for c in rows if c.get("kind") == kind]
        if not part:
            continue
        x = [float(c["latency_ms"]) for c in part]
        text = [_t(c["name"]) + (" (shipped)" if c.get("shipped") else "") for c in part]
        fig.add_trace(go.Scatter(
            x=x, y=[float(c["val_score"]) for c in part], mode="markers", name=f"{kind} (val)",
            legendgroup=kind, text=text, marker={"color": colour, "size": 11,
                                                 "symbol": ["star" if c.get("shipped") else "circle" for c in part]},
            hovertemplate="%{text}<br>validation: %{x:.1f} ms, %{y:.4f}<extra></extra>"))
        fig.add_trace(go.Scatter(
            x=x, y=[float(c["heldout_score"]) for c in part], mode="markers", name=f"{kind} (held out)",
            legendgroup=kind, text=text,
            marker={"color": colour, "size": 11, "line": {"width": 2, "color": colour},
                    "symbol": ["star-open" if c.get("shipped") else "circle-open" for c in part]},
            hovertemplate=f"%{{text}}<br>held out ({_t(where)}): %{{x:.1f}} ms, %{{y:.4f}}<extra></extra>"))
    fig.update_xaxes(title_text="batch-1 latency (ms)", type="log")
    fig.update_yaxes(title_text=_t(metric))
    return _layout(fig, title=f"Ensemble candidates against latency (held out: {_t(where)}, "
                              f"{int(held.get('images') or 0)} images; shipped: star)")


def calibration_figure(summary: dict[str, Any]) -> go.Figure:
    """The shipped model's reliability diagram on held-out images: accuracy against confidence per
    bin, before and after temperature scaling, with the diagonal of perfect calibration.

    Args:
        summary: what `build_ensemble` returned (its `reliability.before` / `.after` bins).

    Returns:
        The figure.
    """
    rel = summary.get("reliability") or {}
    curves = {k: [b for b in rel.get(k) or [] if b.get("images")] for k in ("before", "after")}
    if not curves["before"] and not curves["after"]:
        raise NotEnoughData("the ensemble summary has no reliability bins")
    shipped = next((c for c in summary.get("candidates", []) if c.get("shipped")), {})
    eces = {"before": shipped.get("heldout_ece_before"), "after": shipped.get("heldout_ece_after")}
    fig = make_subplots(rows=1, cols=1)
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                             line={"color": "#a0aec0", "dash": "dash"}, hoverinfo="skip"))
    styles = {"before": ("#c53030", "before temperature"), "after": (_BEST_COLOUR, "after temperature")}
    for key, bins in curves.items():
        if not bins:
            continue
        colour, label = styles[key]
        if eces[key] is not None:
            label += f" (ECE {float(eces[key]):.3f})"
        fig.add_trace(go.Scatter(
            x=[b["confidence"] for b in bins], y=[b["accuracy"] for b in bins], mode="lines+markers", name=label,
            line={"color": colour}, marker={"size": [6 + min(14, b["images"] ** 0.5) for b in bins], "color": colour},
            text=[f"{b['images']} images, confidence {b['low']:.2f}-{b['high']:.2f}" for b in bins],
            hovertemplate="%{text}<br>mean confidence %{x:.3f}, accuracy %{y:.3f}<extra></extra>"))
    fig.update_xaxes(title_text="confidence (mean per bin)", range=[0, 1.02])
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02])
    temperature = shipped.get("temperature")
    title = f"Reliability of {_t(summary.get('shipped', 'the shipped model'))}"
    if temperature is not None:
        title += f", T = {float(temperature):.2f}"
    return _layout(fig, title=title)
