"""The one-screen summary `tlsearch fit` ends with."""

from __future__ import annotations

from typing import Any


def format_fit(summary: Any, *, short: Any = str) -> str:
    """The shipped model, its scores, latency and size, where things are, and each phase's time.

    Args:
        summary: a `FitSummary`.
        short: how paths are printed (default: as they are).

    Returns:
        A few lines of plain text.
    """
    s = summary
    val = f"{s.val_score:.4f}" if s.val_score is not None else "-"
    lines = [
        f"shipped: {s.shipped}" + (f" of trials {', '.join(map(str, s.trials))}" if s.kind == "ensemble" else "")
        + (", refit on train+val" if s.refit else "") + f"  ({s.preset} preset, study {s.study})",
        f"  validation {s.metric} {val}" + (" (the study's value for it)" if s.kind == "trial" else ""),
    ]
    if s.heldout:
        h = s.heldout
        lines.append(f"  held out (test/, {h['images']} images): accuracy {h['accuracy']:.4f}  balanced "
                     f"{h.get('balanced_accuracy', float('nan')):.4f}  macro-F1 {h.get('macro_f1', float('nan')):.4f}")
    latency = f"{s.latency_ms:.1f} ms" if s.latency_ms else "-"
    lines.append(f"  latency {latency} (batch 1)  size {s.size_mb:.1f} MB")
    lines.append(f"model: {short(s.model_dir)}")
    if s.report:
        lines.append(f"report: {short(s.report)}")
    phases = "  ".join(f"{name} {sec:.1f}s" for name, sec in s.phases)
    over = s.wall_seconds / s.budget_s
    lines.append(f"time: {s.wall_seconds:.1f}s of {s.budget_s:.0f}s ({over:.0%})  = {phases}"
                 + ("" if s.searched else "  (search done earlier: not repeated)"))
    lines += [f"note: {n}" for n in s.notes]
    return "\n".join(lines)
