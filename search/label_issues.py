"""Label issues: the images whose given label is most likely wrong (`tlsearch check DATA --labels`).

Confident learning (cleanlab; Northcutt et al., JAIR 2021) needs out-of-sample predicted
probabilities for every image. They come from a linear probe on one backbone's frozen features:
the pooled body output of every train and val image (never test/), from the same feature cache
the head-only trials use (`features.cached_features`, same key: a search's probes and this check
share the work), then k folds of a multinomial logistic regression, each image predicted by the
probe that did not see it. cleanlab's `find_label_issues` picks and ranks the suspects (by self
confidence: the lowest probability of the given label first); each comes with the class the probe
suggests instead.

The result is also kept under `<cache dir>/label_issues/<dataset fingerprint>.json`, where the
report of a study on that dataset (same files, same split) finds it and shows it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from search.config import TLSearchError, atomic_write_text, default_cache_dir

if TYPE_CHECKING:
    import numpy as np

    from search.data import DatasetIndex

DEFAULT_LABEL_BACKBONE = "timm/tf_efficientnet_lite0"
DEFAULT_LABEL_IMAGE_SIZE = 128
DEFAULT_FOLDS = 5
INSTALL_HINT = "pip install 'tlsearch[labels]' (or: pip install cleanlab)"


@dataclass(frozen=True)
class LabelIssues:
    """What `find_label_issues` found, JSON-ready through `to_dict`."""

    backbone: str  # whose features the probe read
    image_size: int  # the side the images were fed at
    folds: int  # k of the k-fold out-of-sample predictions
    images: int  # train + val images checked
    probe_accuracy: float  # accuracy of the out-of-fold predictions against the given labels
    seconds: float  # wall time, features included
    feature_seconds: float  # of which computing (or reading) the features
    fingerprint: str  # the dataset fingerprint (files and split) it describes
    issues: list[dict[str, Any]] = field(default_factory=list)  # ranked: rank, path, split, given, suggested,
    # given_prob, suggested_prob (out-of-fold probabilities)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_cleanlab() -> Any:
    """cleanlab's filter module, or a clear error saying how to install it."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        raise TLSearchError(f"check --labels needs cleanlab, which is not installed: {INSTALL_HINT}") from None
    return find_label_issues


def find_label_issues(
    index: DatasetIndex,
    *,
    backbone: str = DEFAULT_LABEL_BACKBONE,
    image_size: int = DEFAULT_LABEL_IMAGE_SIZE,
    weights_dir: str | None = None,
    pretrained: bool = True,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    device: str | None = None,
    cache_dir: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> LabelIssues:
    """Ranks the train and val images whose given label is most likely wrong.

    Args:
        index: the scanned dataset (test/ is never read).
        backbone: whose pretrained features the probe reads (a registry or timm/<name> name).
        image_size: the side the images are fed at.
        weights_dir: a folder with <model name>.pth, as for `run`.
        pretrained: False: random weights (for tests; random features find few label errors).
        folds: k of the out-of-fold predictions (at least 2; fewer when a class has fewer images).
        seed: the folds' shuffle.
        device: where the backbone runs; None: CUDA when available.
        cache_dir: the image and feature cache; None: the default.
        progress: called with one line per step.

    Returns:
        The ranked issues and how they were found.
    """
    cleanlab_find = require_cleanlab()
    say = progress or (lambda _: None)
    start = time.perf_counter()
    samples = [*index.train, *index.val]
    labels = [y for _, y in samples]
    if len(index.classes) < 2:
        raise TLSearchError("check --labels needs at least 2 classes")
    say(f"features of {len(samples)} train and val images ({backbone} at {image_size} px)")
    feats = _features(index, backbone=backbone, image_size=image_size, weights_dir=weights_dir,
                      pretrained=pretrained, device=device, cache_dir=cache_dir)
    feature_seconds = time.perf_counter() - start
    k = _folds(labels, folds)
    say(f"out-of-fold probabilities: {k} folds of a linear probe")
    probs = out_of_fold_probs(feats, labels, n_classes=len(index.classes), folds=k, seed=seed)
    import numpy as np

    y = np.asarray(labels)
    ranked = cleanlab_find(labels=y, pred_probs=probs, return_indices_ranked_by="self_confidence")
    splits = ["train"] * len(index.train) + ["val"] * len(index.val)
    issues = []
    for rank, i in enumerate(ranked.tolist(), start=1):
        suggested = int(probs[i].argmax())
        issues.append({"rank": rank, "path": samples[i][0], "split": splits[i],
                       "given": index.classes[labels[i]], "suggested": index.classes[suggested],
                       "given_prob": round(float(probs[i, labels[i]]), 4),
                       "suggested_prob": round(float(probs[i, suggested]), 4)})
    result = LabelIssues(
        backbone=backbone, image_size=image_size, folds=k, images=len(samples),
        probe_accuracy=round(float((probs.argmax(1) == y).mean()), 4), seconds=round(time.perf_counter() - start, 2),
        feature_seconds=round(feature_seconds, 2), fingerprint=index.fingerprint, issues=issues,
    )
    return result


def out_of_fold_probs(feats: "np.ndarray", labels: list[int], *, n_classes: int, folds: int, seed: int = 0,
                      weight_decay: float = 1e-3) -> "np.ndarray":
    """Each row's class probabilities from a linear probe fitted on the other folds.

    Args:
        feats: (N, D) features.
        labels: N given classes.
        n_classes: columns of the result.
        folds: stratified folds (each class spread over them).
        seed: the shuffle of the folds.
        weight_decay: the probe's L2 penalty (on standardised features).

    Returns:
        (N, n_classes) float64 probabilities.
    """
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    x = np.asarray(feats, dtype=np.float32)
    # Unit-length rows, then standardised columns: the penalty then means the same whatever the
    # backbone's feature scale.
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
    y = np.asarray(labels)
    probs = np.zeros((len(y), n_classes))
    for fit, held in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y):
        mean, std = x[fit].mean(0), x[fit].std(0) + 1e-6
        probs[held] = _probe((x[fit] - mean) / std, y[fit], (x[held] - mean) / std, n_classes=n_classes,
                             weight_decay=weight_decay)
    return probs


def _probe(x: "np.ndarray", y: "np.ndarray", x_held: "np.ndarray", *, n_classes: int, weight_decay: float) -> "np.ndarray":
    """Multinomial logistic regression, full batch, L-BFGS (at most 100 steps). The penalty 1e-3
    was chosen on aid25 (60 train + 20 val images per class, 2.5% of train labels flipped): over two
    draws it put 0.89 of the flips in the top 2k listed, 3e-3 0.86; 1e-4 0.84 on one draw, and it
    took 10x longer to converge. Reading all features beat their 256 principal components."""
    import torch

    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    linear = torch.nn.Linear(x.shape[1], n_classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=100, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(xt), yt) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return linear(torch.from_numpy(x_held)).softmax(1).double().numpy()


def _folds(labels: list[int], folds: int) -> int:
    from collections import Counter

    if folds < 2:
        raise TLSearchError(f"--folds must be at least 2, got {folds}")
    smallest = min(Counter(labels).values())
    if smallest < 2:
        raise TLSearchError("check --labels needs at least 2 train+val images in every class")
    return min(folds, smallest)


def _features(index: DatasetIndex, *, backbone: str, image_size: int, weights_dir: str | None,
              device: str | None, cache_dir: str | None, pretrained: bool = True) -> "np.ndarray":
    """The pooled body output of every train then val image, through the shared feature cache."""
    import torch

    from search import augment, backbones, data, features
    from search.config import TrialConfig
    from search.trial import pick_device

    dev = pick_device(device)
    # The key of a head-only, augmentation-free trial of this backbone and size: its cached
    # features are these, so a search and this check compute them once between them.
    config = TrialConfig(backbone=backbone, image_size=image_size, freeze_depth="all", augmentation="none",
                         pretrained=pretrained)
    bb = backbones.build_backbone(backbone, len(index.classes), pretrained=pretrained, weights_dir=weights_dir)
    tf = augment.eval_transform(image_size, mean=bb.mean, std=bb.std)
    train_ds, val_ds = data.dataset_splits(index, image_size=image_size, train_transform=tf, eval_transform=tf,
                                           cache=True, cache_dir=cache_dir)
    folder = Path(cache_dir or default_cache_dir()) / "features"
    body = bb.model.body.to(dev, memory_format=torch.channels_last)
    parts = []
    for split, ds in (("train", train_ds), ("val", val_ds)):
        if len(ds) == 0:
            continue
        key = features.feature_key(config, bb, fingerprint=index.fingerprint, split=split)
        if features.weights_identity(config, bb):
            f, _ = features.cached_features(folder / f"{key}.pt", body, ds, device=dev)
        else:  # weights that do not say what they are cannot be cached under a key
            f, _ = features.compute_features(body, ds, device=dev)
        parts.append(f.float().flatten(1))
    return torch.cat(parts).numpy()


def issues_path(fingerprint: str, *, cache_dir: str | Path | None = None) -> Path:
    """Where the last `check --labels` of a dataset (its fingerprint) is kept."""
    return Path(cache_dir or default_cache_dir()) / "label_issues" / f"{fingerprint}.json"


def keep(result: LabelIssues, *, cache_dir: str | Path | None = None) -> Path | None:
    """Writes the result where a study's report finds it; None when it cannot be written."""
    path = issues_path(result.fingerprint, cache_dir=cache_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({**result.to_dict(), "written_at": time.time()}) + "\n")
    except OSError:
        return None
    return path


def read_kept(fingerprint: str | None, *, cache_dir: str | Path | None = None) -> dict | None:
    """The kept result for a dataset fingerprint, or None (none, or unreadable)."""
    if not fingerprint:
        return None
    try:
        d = json.loads(issues_path(fingerprint, cache_dir=cache_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("issues"), list) else None


def format_label_issues(result: LabelIssues, *, root: str, shown: int = 30) -> list[str]:
    """The lines `tlsearch check --labels` prints."""
    from search.data._index import _relative

    head = (f"label issues: {len(result.issues)} image(s) whose label looks wrong, out of {result.images} train+val "
            f"(linear probe on {result.backbone} features at {result.image_size} px, {result.folds}-fold "
            f"out-of-sample accuracy {result.probe_accuracy:.3f}; cleanlab; {result.seconds:.0f} s)")
    if not result.issues:
        return [head]
    width = max(len(str(min(len(result.issues), shown))), 4)
    lines = [head + ", most likely first:",
             f"  {'rank':>{width}}  split  given -> suggested (probabilities)  file"]
    for r in result.issues[:shown]:
        lines.append(f"  {r['rank']:>{width}}  {r['split']:<5}  {r['given']} ({r['given_prob']:.2f}) -> "
                     f"{r['suggested']} ({r['suggested_prob']:.2f})  {_relative(r['path'], root)}")
    if len(result.issues) > shown:
        lines.append(f"  ... and {len(result.issues) - shown} more (all in --json)")
    return lines
