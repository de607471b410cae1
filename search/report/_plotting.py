"""What every figure (and the page around them) shares: the state colours, the common layout,
how a user string becomes label text, how a number is shown, and `NotEnoughData`.
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

# One colour per trial state, used by the table badges and every plot.
STATE_COLOURS = {
    "COMPLETE": "#2b6cb0",
    "PRUNED": "#a0aec0",
    "FAIL": "#c53030",
    "RUNNING": "#d69e2e",
    "WAITING": "#718096",
}
_BEST_COLOUR = "#2f855a"
_PLOT_HEIGHT = 420


class NotEnoughData(Exception):
    """A plot cannot be drawn from this study yet; the message says why (shown on the page)."""


def _t(v: Any) -> str:
    """A user string as plotly label text: plotly reads labels as a subset of HTML, so escape."""
    return html.escape(str(v))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.2e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) else f"{v:.4g}"
    return "-" if v is None or v is pd.NA else str(v)


def _finite(s: pd.Series) -> pd.Series:
    """A boolean mask: the value is a finite number (NaN, inf, None and text are not)."""
    numbers = pd.to_numeric(s, errors="coerce").astype("float64")
    return pd.Series(np.isfinite(numbers), index=s.index, dtype=bool)


def _complete(board: pd.DataFrame, metric: str) -> pd.DataFrame:
    return board[(board["state"] == "COMPLETE") & _finite(board[metric])]


def _layout(fig: go.Figure, *, title: str, **kw: Any) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0.01},
        height=_PLOT_HEIGHT,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        template="plotly_white",
        font={"family": "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"},
        legend={"orientation": "h", "y": -0.18},
        **kw,
    )
    return fig
