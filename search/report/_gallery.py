"""The error gallery's data: the validation images a trial gets wrong, and its most confused pairs.

Where the predictions come from: a trial that ran its whole budget keeps its validation logits
beside its checkpoint (`model_io.save_val_logits`, in the dataset index's val order, with the
labels); `tlsearch ensemble` reads the same file. The report reads it for the best kept trials,
scans the study's dataset on its recorded split to learn which file each row is (the labels must
agree row for row, or the trial is left out), and embeds each shown image as a small JPEG
(a data: URI, which the page's content security policy allows). Nothing is run through a model.

Bounded: at most `max_images` wrong images per trial (highest loss first) and `max_trials`
trials; an image shown for several trials is embedded once.
"""

from __future__ import annotations

import base64
import io
import math
from typing import TYPE_CHECKING, Any

from search.config import TLSearchError

if TYPE_CHECKING:
    from search.data import DatasetIndex
    from search.studies import TrialRecord

DEFAULT_GALLERY_IMAGES = 60  # wrong images shown per trial, highest loss first
DEFAULT_GALLERY_TRIALS = 3  # the best kept trials that get a gallery
THUMB_SIDE = 96  # longest side of an embedded thumbnail, pixels
THUMB_QUALITY = 70  # its JPEG quality
TOP_PAIRS = 10  # most confused (true, predicted) pairs listed


def gallery_data(
    records: "list[TrialRecord]",
    attrs: dict[str, Any],
    *,
    best: int | None,
    max_images: int = DEFAULT_GALLERY_IMAGES,
    max_trials: int = DEFAULT_GALLERY_TRIALS,
) -> dict | str:
    """The gallery of the best kept trials, as plain data.

    Args:
        records: the study's trials, best first (the leaderboard's order).
        attrs: the study's user_attrs (dataset, split_spec, dataset_fingerprint, class_names).
        best: the best trial's number; it comes first when its logits are kept.
        max_images: wrong images per trial.
        max_trials: trials with a gallery.

    Returns:
        {"trials": [{"trial", "wrong", "images", "pairs": [{"true", "pred", "count"}],
        "shown": [{"image", "true", "pred", "prob", "true_prob", "loss"}]}], "images":
        [{"name", "src"}], "classes": [...]}; or a one-line reason why there is none.
    """
    import torch

    from search.disk import logits_path

    kept = [r for r in records if r.state == "COMPLETE" and r.checkpoint and logits_path(r.checkpoint).is_file()]
    kept.sort(key=lambda r: r.number != best)  # stable: the best first, then the leaderboard's order
    if not kept:
        return ("no trial kept its validation predictions (a trial keeps them with its checkpoint when it "
                "runs its whole budget; removed checkpoints take them along)")
    try:
        index = _study_index(attrs)
    except (TLSearchError, OSError) as e:
        return f"the study's dataset could not be read to show its images: {e}"
    classes = list(index.classes)
    labels = torch.tensor([y for _, y in index.val], dtype=torch.long)
    images: dict[int, int] = {}  # val row -> position in the embedded list
    out_images: list[dict[str, str]] = []
    trials = []
    for rec in kept:
        if len(trials) == max_trials:
            break
        from search.model_io import load_val_logits

        got = load_val_logits(rec.checkpoint)
        if got is None or got[0].shape != (len(labels), len(classes)) or not torch.equal(got[1], labels):
            continue  # another split, dataset or class list than the one scanned: rows would lie
        view = trial_errors(got[0], labels, max_images=max_images)
        shown = []
        for row in view["shown"]:
            i = row.pop("row")
            if i not in images:
                src = thumbnail(index.val[i][0])
                if src is None:
                    continue
                images[i] = len(out_images)
                out_images.append({"name": _name(index, index.val[i][0]), "src": src})
            shown.append({"image": images[i], **row})
        trials.append({"trial": rec.number, "wrong": view["wrong"], "images": len(labels),
                       "pairs": view["pairs"], "shown": shown})
    if not trials:
        return "the kept validation predictions do not match the study's dataset as it is now"
    return {"trials": trials, "images": out_images, "classes": classes}


def trial_errors(logits: "torch.Tensor", labels: "torch.Tensor", *, max_images: int,
                 top_pairs: int = TOP_PAIRS) -> dict[str, Any]:
    """A trial's mistakes on validation, from its logits (a pure function of the two tensors).

    Args:
        logits: (N, classes) validation logits.
        labels: (N,) true classes.
        max_images: the most wrong rows returned.
        top_pairs: the most (true, predicted) pairs returned.

    Returns:
        {"wrong": count, "pairs": [{"true", "pred", "count"}] most frequent first (ties by class
        index), "shown": [{"row", "true", "pred", "prob", "true_prob", "loss"}] highest loss
        first}: prob is the predicted class's probability, loss the cross-entropy of the true one.
    """
    import torch

    probs = logits.float().softmax(1)
    pred = probs.argmax(1)
    wrong = (pred != labels).nonzero().flatten()
    true_p = probs[torch.arange(len(labels)), labels]
    loss = -true_p.clamp_min(1e-12).log()
    order = wrong[torch.argsort(loss[wrong], descending=True, stable=True)]
    counts: dict[tuple[int, int], int] = {}
    for i in wrong.tolist():
        key = (int(labels[i]), int(pred[i]))
        counts[key] = counts.get(key, 0) + 1
    pairs = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_pairs]
    shown = [{"row": int(i), "true": int(labels[i]), "pred": int(pred[i]), "prob": round(float(probs[i, pred[i]]), 4),
              "true_prob": round(float(true_p[i]), 4), "loss": round(float(loss[i]), 4) if math.isfinite(loss[i]) else None}
             for i in order[:max_images].tolist()]
    return {"wrong": len(wrong), "pairs": [{"true": t, "pred": p, "count": n} for (t, p), n in pairs], "shown": shown}


def thumbnail(path: str, *, side: int = THUMB_SIDE, quality: int = THUMB_QUALITY) -> str | None:
    """A small JPEG of an image file as a data: URI; None when the file no longer decodes."""
    from PIL import Image

    from search.data import BadImageError, load_image

    try:
        im = load_image(path, draft=side)
    except (BadImageError, OSError):
        return None
    im.thumbnail((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _study_index(attrs: dict[str, Any]) -> "DatasetIndex":
    from search.trial import training_index

    source = attrs.get("dataset")
    if not source:
        raise TLSearchError("the study records no dataset")
    record = {"split": attrs.get("split_spec"), "dataset_fingerprint": attrs.get("dataset_fingerprint")}
    return training_index(source, record, source="the study", warn=lambda _: None)


def _name(index: "DatasetIndex", path: str) -> str:
    from search.data._index import _relative

    return _relative(path, index.root)
