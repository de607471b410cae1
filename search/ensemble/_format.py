"""Text for the terminal: the ensemble step's candidates table, and `evaluate`'s scores."""

from __future__ import annotations

from typing import Any

from search.ensemble._select import metric_value


def format_ensemble(summary: dict[str, Any]) -> str:
    """The candidates table `tlsearch ensemble` prints.

    Args:
        summary: what `build_ensemble` returns.

    Returns:
        Multi-line text without a trailing newline.
    """
    held = summary["heldout"]
    where = ("test/" if held["kind"] == "test" else "cross-fitted on validation halves, OPTIMISTIC")
    metric = summary["metric"]
    lines = [
        f"choices on validation ({summary['val_images']} images, {metric}); held out: {where}, "
        f"{held['images']} images",
    ]
    if held.get("optimistic"):
        lines.append(f"  ({held['note']})")
    width = max(len("candidate"), *(len(c["name"]) for c in summary["candidates"]))
    lines += ["", f"  {'candidate':<{width}}  {'val':>6}  {'held-out':>8}  {'ECE held-out':>13}  {'latency':>9}  "
                  f"{'size':>8}  members"]
    for c in summary["candidates"]:
        members = ", ".join(_member(m) for m in c["members"])
        ece = f"{c['heldout_ece_before']:.3f}>{c['heldout_ece_after']:.3f}"
        mark = "*" if c["shipped"] else " "
        lines.append(f"{mark} {c['name']:<{width}}  {c['val_score']:>6.4f}  {c['heldout_score']:>8.4f}  {ece:>13}  "
                     f"{c['latency_ms']:>6.1f} ms  {c['size_mb']:>5.1f} MB  {members}  T={c['temperature']:.2f}")
    lines += ["", f"shipped (*): {summary['shipped']}; held-out {metric} of the whole procedure "
                  f"{summary['shipped_heldout_score']:.4f} on {held['images']} images"
                  + (" (optimistic)" if held.get("optimistic") else "")]
    guard = summary.get("guard") or {}
    if guard.get("over_latency"):
        lines.append(f"  (left out, slower alone than --max-latency-ms: "
                     f"{', '.join(f'trial {n}' for n in guard['over_latency'])})")
    if guard.get("shipped_single"):
        # Each as the best's value minus the single trial's, in its own sign; val_loss is the log loss.
        change = f"{metric} {metric_value(guard['gain'], metric):+.4f}"
        if metric != "val_loss":
            change += f", log loss {-guard.get('loss_gain', 0.0):+.4f}"
        lines.append(f"  ({guard['val_best']} scored best on validation but did not beat the best single trial "
                     f"out of sample on validation halves ({change} on {guard['images']} images): "
                     "the single trial ships)")
    if summary.get("test"):
        lines += ["", format_evaluation(summary["test"], title="test/ (shipped model)")]
    if summary.get("model_dir"):
        lines.append(f"model saved to {summary['model_dir']} (tlsearch predict {summary['model_dir']} IMAGE...)")
    return "\n".join(lines)


def _member(m: dict[str, Any]) -> str:
    name = m["member"]
    return f"{name} x{m['weight']:g}" if m["weight"] != 1 else name


def format_evaluation(result: dict[str, Any], *, title: str | None = None) -> str:
    """Accuracy, balanced accuracy, macro-F1, the per-class table and the confusion matrix as text.

    Args:
        result: what `evaluate_model` (or `classification_summary`) returns.
        title: the first line; None: "test/ of <dataset>".

    Returns:
        Multi-line text without a trailing newline.
    """
    rows = result["per_class"]
    names = [r["class"] for r in rows]
    lines = [
        title or f"test/ of {result.get('dataset', '?')}",
        f"  {result['images']} images: accuracy {result['accuracy']:.4f}  balanced accuracy "
        f"{result['balanced_accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}",
    ]
    width = max(len("class"), *(len(n) for n in names))
    lines.append(f"  {'class':<{width}}  {'precision':>9}  {'recall':>6}  {'F1':>6}  {'images':>6}  "
                 "confusion (columns: predicted, in this order)")
    for r, row in zip(rows, result["confusion_matrix"]):
        lines.append(f"  {r['class']:<{width}}  {r['precision']:>9.3f}  {r['recall']:>6.3f}  {r['f1']:>6.3f}  "
                     f"{r['support']:>6}  " + " ".join(f"{v:>4}" for v in row))
    return "\n".join(lines)
