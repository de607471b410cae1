"""Figures of what the trials did: their per-epoch curves, what they cost (parameters, latency) against
their score, when and where they ran, and the best trial's confusion matrix. Each takes plain data
(`ReportData` tables) and returns a plotly Figure, or raises `NotEnoughData`.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from search.report._plotting import _BEST_COLOUR, STATE_COLOURS, NotEnoughData, _complete, _layout, _t
from search.studies import pareto_flags


def curves_figure(curves: pd.DataFrame, *, metric: str, best_trial: int | None) -> go.Figure:
    """Learning curves: the per-epoch score of every trial; pruned trials dashed, ending in a cross.

    The objective is drawn first; every other metric the trials recorded per epoch (the curves'
    columns after `value`) is one choice of a menu on the plot, so any of them can be read.

    Args:
        curves: `ReportData.curves` (trial, state, epoch, value, then one column per recorded metric).
        metric: the objective's name (axis title).
        best_trial: the number of the best trial, drawn thick; None when there is none.

    Returns:
        The figure.
    """
    if not len(curves):
        raise NotEnoughData("no trial has reported a per-epoch value yet")
    fixed = ("trial", "state", "epoch", "value")
    others = [c for c in curves.columns if c not in fixed and c != metric
              and pd.to_numeric(curves[c], errors="coerce").notna().any()]
    fig = go.Figure()
    groups = [(metric, "value")] + [(m, m) for m in others]
    counts = []
    for i, (_, column) in enumerate(groups):
        counts.append(_curve_traces(fig, curves, column, best_trial=best_trial, visible=i == 0))
    fig.update_xaxes(title_text="epoch", dtick=1)
    fig.update_yaxes(title_text=_t(metric))
    if others:
        buttons = []
        for i, (name, _) in enumerate(groups):
            visible = [j == i for j, n in enumerate(counts) for _ in range(n)]
            label = f"{name} (objective)" if i == 0 else name
            buttons.append({"label": _t(label), "method": "update",
                            "args": [{"visible": visible}, {"yaxis.title.text": _t(name)}]})
        fig.update_layout(updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "xanchor": "right",
                                        "y": 1.15, "yanchor": "top", "showactive": True}])
    return _layout(fig, title="Learning curves (per epoch)")


def _curve_traces(fig: go.Figure, curves: pd.DataFrame, column: str, *, best_trial: int | None, visible: bool) -> int:
    """Adds one line per trial of `column` over the epochs; returns how many traces it added."""
    styles = {"COMPLETE": "solid", "PRUNED": "dash", "FAIL": "dot", "RUNNING": "longdash"}
    shown: set[str] = set()
    n = 0
    for trial, part in curves.groupby("trial", sort=True):
        part = part.sort_values("epoch")
        state = str(part["state"].iloc[0])
        best = trial == best_trial
        name = "best trial" if best else state.lower()
        colour = _BEST_COLOUR if best else STATE_COLOURS.get(state, "#718096")
        stopped = state in ("PRUNED", "FAIL")
        fig.add_trace(
            go.Scatter(
                x=part["epoch"],
                y=part[column],
                mode="lines+markers",
                name=name,
                legendgroup=name,
                showlegend=name not in shown,
                visible=visible,
                line={"color": colour, "dash": styles.get(state, "solid"), "width": 4 if best else 1.5},
                # A stopped trial ends in a cross, so it reads as cut short, not as converged.
                marker={"size": [0] * (len(part) - 1) + [11 if stopped else 0], "symbol": "x", "color": colour},
                hovertemplate=f"trial {int(trial)} ({state.lower()})<br>epoch %{{x}}: %{{y:.4f}}<extra></extra>",
            )
        )
        shown.add(name)
        n += 1
    return n


_COSTS = (("params", "parameters (millions)", 1e-6), ("latency_ms", "batch-1 latency (ms)", 1.0))


def cost_figure(board: pd.DataFrame, *, metric: str, maximize: bool) -> go.Figure:
    """Score against cost (parameters, latency) of the complete trials, with the Pareto front.

    Args:
        board: the leaderboard.
        metric: the objective's column.
        maximize: direction of the objective.

    Returns:
        The figure, one panel per cost that was recorded.
    """
    complete = _complete(board, metric)
    panels = [c for c in _COSTS if complete[c[0]].notna().any()]
    if not panels:
        raise NotEnoughData("no complete trial has recorded params or latency yet")
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True, horizontal_spacing=0.06)
    for col_i, (col, label, scale) in enumerate(panels, start=1):
        part = complete[complete[col].notna()]
        cost = (part[col].astype(float) * scale).tolist()
        front = pareto_flags(cost, part[metric].tolist(), maximize=maximize)
        text = [f"trial {int(t)} ({_t(b)})" for t, b in zip(part["trial"], part["backbone"])]
        fig.add_trace(
            go.Scatter(x=cost, y=part[metric], mode="markers", text=text, name="complete",
                       legendgroup="complete", showlegend=col_i == 1,
                       marker={"color": STATE_COLOURS["COMPLETE"], "size": 8, "opacity": 0.6},
                       hovertemplate="%{text}<br>%{x:.3g}, %{y:.4f}<extra></extra>"),  # fmt: skip
            row=1,
            col=col_i,
        )
        on = sorted((c, s, tx) for c, s, tx, f in zip(cost, part[metric], text, front) if f)
        fig.add_trace(
            go.Scatter(x=[p[0] for p in on], y=[p[1] for p in on], text=[p[2] for p in on],
                       mode="lines+markers", name="Pareto front", legendgroup="front",
                       showlegend=col_i == 1, line={"shape": "hv", "color": _BEST_COLOUR, "width": 2},
                       marker={"size": 12, "symbol": "circle-open", "color": _BEST_COLOUR, "line": {"width": 2}},
                       hovertemplate="%{text} (Pareto)<br>%{x:.3g}, %{y:.4f}<extra></extra>"),  # fmt: skip
            row=1,
            col=col_i,
        )
        fig.update_xaxes(title_text=label, row=1, col=col_i)
    fig.update_yaxes(title_text=_t(metric), row=1, col=1)
    return _layout(fig, title="Score against cost (complete trials; Pareto front marked)")


def timeline_figure(trials: pd.DataFrame) -> go.Figure:
    """Trial timeline per worker: one bar per trial from start to finish, coloured by state.

    Gaps between bars on a worker's row are idle capacity; the title gives the busy share.

    Args:
        trials: `ReportData.trials` (trial, state, backbone, worker, start, end).

    Returns:
        The figure.
    """
    timed = trials[trials["start"].notna() & trials["end"].notna()]
    if not len(timed):
        raise NotEnoughData("no trial has recorded when it started and finished")
    t0, t1 = timed["start"].min(), timed["end"].max()
    workers = sorted(timed["worker"].unique())
    busy = float((timed["end"] - timed["start"]).clip(lower=0).sum())
    span = max(t1 - t0, 1e-9) * len(workers)
    fig = go.Figure()
    for state in [s for s in STATE_COLOURS if s in set(timed["state"])]:
        part = timed[timed["state"] == state]
        fig.add_trace(
            go.Bar(
                y=[_t(w) for w in part["worker"]],
                x=(part["end"] - part["start"]) / 60,
                base=(part["start"] - t0) / 60,
                orientation="h",
                name=state.lower(),
                marker={"color": STATE_COLOURS[state], "line": {"color": "white", "width": 1}},
                text=[f"#{int(t)}" for t in part["trial"]],
                textposition="inside",
                insidetextanchor="middle",
                customdata=[[int(t), _t(b)] for t, b in zip(part["trial"], part["backbone"])],
                hovertemplate=(
                    "trial %{customdata[0]} (%{customdata[1]})<br>from %{base:.1f} min, "
                    "%{x:.1f} min<extra>" + state.lower() + "</extra>"
                ),
            )
        )
    fig.update_xaxes(title_text="minutes since the study started")
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=[_t(w) for w in workers])
    title = f"Trial timeline per worker ({len(workers)} workers busy {busy / span:.0%} of the time)"
    return _layout(fig, title=title, barmode="overlay", bargap=0.3)


def confusion_figure(matrix: list[list[float]], *, class_names: list[str] | None, trial: int) -> go.Figure:
    """Confusion matrix of the best trial's last epoch on the validation set (rows: true class).

    Args:
        matrix: square counts, rows = true class, columns = predicted class.
        class_names: names in class-index order; None or the wrong length: "class i".
        trial: the trial number (title).

    Returns:
        The figure.
    """
    try:
        z = [[float(v) for v in row] for row in matrix]
    except (TypeError, ValueError):
        raise NotEnoughData("the best trial's confusion matrix is not a table of numbers") from None
    n = len(z)
    if n == 0 or any(len(row) != n for row in z):
        raise NotEnoughData(f"the best trial's confusion matrix is not square ({n} rows)")
    names = list(class_names) if class_names and len(class_names) == n else [f"class {i}" for i in range(n)]
    labels = [_t(c) for c in names]
    totals = [sum(row) or 1.0 for row in z]
    share = [[v / totals[i] for v in row] for i, row in enumerate(z)]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=labels,
            y=labels,
            customdata=share,
            colorscale="Blues",
            texttemplate="%{z:.0f}" if n <= 30 else None,
            hovertemplate="true %{y}<br>predicted %{x}<br>%{z:.0f} (%{customdata:.0%} of the row)<extra></extra>",
        )
    )
    fig.update_xaxes(title_text="predicted class", type="category")
    fig.update_yaxes(title_text="true class", type="category", autorange="reversed")
    return _layout(fig, title=f"Confusion matrix of the best trial (#{trial}, last epoch, validation set)")
