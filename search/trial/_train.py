"""`tlsearch train`: one config trained again on DATA (a reproduction, or the final fit), saved
as a model folder.

`train` reads the config file, scans DATA on the split the config's study used (`training_index`
checks that DATA is the study's dataset), runs `fine_tune` once and returns a summary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from search.config import TrialConfig
from search.model_io import save_model
from search.trial._loop import fine_tune

if TYPE_CHECKING:
    from search.data import DatasetIndex

# The split `train` uses when a config records none (a hand-written one): `tlsearch run`'s defaults.
DEFAULT_SPLIT_SEED = 0
DEFAULT_VAL_FRACTION = 0.2


def training_index(
    data: str | os.PathLike,
    record: dict[str, Any],
    *,
    seed: int | None = None,
    val_fraction: float | None = None,
    allow_changed_data: bool = False,
    source: str = "config",
    warn: Callable[[str], None] | None = None,
) -> DatasetIndex:
    """Scans DATA the way the config's study did: its recorded split, checked against its dataset.

    A config exported from a study records the study's split (`split`) and dataset fingerprint;
    validating on exactly that split is what makes `train`'s val_acc comparable with the study's.

    Args:
        data: the dataset folder.
        record: the config file's mapping (`split`, `dataset_fingerprint` and `study` are read).
        seed: an explicit seed of the random split, overriding the recorded one (with a warning).
        val_fraction: an explicit validation share, overriding the recorded one (with a warning).
        allow_changed_data: train on a dataset that is not the study's (a warning) instead of
            stopping with a `DatasetError`.
        source: the config's name in messages.
        warn: called with one line per warning; default prints "warning: ..." to stderr.

    Returns:
        The scanned dataset (`search.data.DatasetIndex`).
    """
    from search.data import DatasetError, SplitSpec, scan_dataset

    warn = _warn if warn is None else warn
    if record.get("split") is None:
        seed = DEFAULT_SPLIT_SEED if seed is None else seed
        val_fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        if record.get("dataset_fingerprint"):
            warn(f"{source} records no split (exported by an older tlsearch): splitting with seed {seed} and "
                 f"val_fraction {val_fraction:g}, and DATA is not checked against the study's dataset")
        return scan_dataset(data, val_fraction=val_fraction, seed=seed)
    recorded = SplitSpec.from_dict(record["split"], source=f"{source}: split")
    index = scan_dataset(data, **recorded.scan_args())
    expected = record.get("dataset_fingerprint")
    if expected and index.fingerprint != expected:
        whose = f"study {record['study']!r}" if record.get("study") else source
        what = f"{index.source} is not the dataset of {whose} (fingerprint {index.fingerprint}, recorded {expected})"
        if not allow_changed_data:
            raise DatasetError(f"{what}; its val_acc would not compare; --allow-changed-data trains on it anyway")
        warn(f"{what}: training on it as asked; val_acc does not compare with the study's")
    if seed is None and val_fraction is None:
        return index
    return _override_split(index, seed=seed, val_fraction=val_fraction, warn=warn)


def _override_split(index: DatasetIndex, *, seed: int | None, val_fraction: float | None, warn: Callable[[str], None]) -> DatasetIndex:
    """The index re-split with an explicit seed and/or fraction; one warning line when it changes."""
    from search.data import resplit

    spec = index.split_spec
    if not spec.drawn:
        how = "its val rows" if index.label_file else "its folders"
        warn(f"--seed and --val-fraction ignored: {index.source} is split by {how} ({index.split})")
        return index
    new_seed = spec.seed if seed is None else seed
    new_fraction = spec.val_fraction if val_fraction is None else val_fraction
    if (new_seed, new_fraction) == (spec.seed, spec.val_fraction):
        return index
    warn(f"overriding the recorded split (val_fraction {spec.val_fraction:g}, seed {spec.seed}) with "
         f"val_fraction {new_fraction:g}, seed {new_seed}: val_acc does not compare with the study's")
    return resplit(index, val_fraction=new_fraction, seed=new_seed)


def _warn(message: str) -> None:
    import sys

    print(f"warning: {message}", file=sys.stderr, flush=True)


def train(
    config: TrialConfig | str | os.PathLike,
    data: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    weights_dir: str | None = None,
    cache: bool = True,
    full: bool = False,
    val_fraction: float | None = None,
    seed: int | None = None,
    allow_changed_data: bool = False,
    progress: bool = True,
    device: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Trains one config on a dataset (a reproduction, or the final fit) and saves the model.

    Args:
        config: a TrialConfig, or a YAML/JSON file as written by `tlsearch export`.
        data: the dataset folder.
        out: the model folder to write; None: do not save.
        weights_dir: folder of `<model name>.pth` state dicts used instead of downloads.
        cache: use the image and feature caches.
        full: train on train+val (the final fit).
        val_fraction: validation share of a random split; None: the split the config records
            (the study's), else 0.2. Given, it overrides the recorded one with a warning.
        seed: seed of a random split (not the training seed, `config.seed`); None: the recorded
            one, else 0. Given, it overrides the recorded one with a warning.
        allow_changed_data: train even when DATA is not the dataset the config's study searched.
        progress: print one line per epoch on stderr.
        device: None: CUDA when available.
        threads: torch CPU threads; None: the `threads` an exported config records (the trial's
            own, so that the trial is reproduced exactly), else torch's default.

    Returns:
        Final metrics: val_acc, val_loss, val_balanced_acc, val_macro_f1, best_val_acc, epochs, seconds,
        params_total, params_trainable, latency_ms, model_dir.
    """
    import sys

    from search.backbones import resolve_depth
    from search.config import absolute_path, load_trial_config, load_yaml

    cfg = config if isinstance(config, TrialConfig) else load_trial_config(config)
    # An unknown backbone or a freeze depth it does not have: one error line before any work.
    resolve_depth(cfg.backbone, cfg.freeze_depth)
    weights_dir = absolute_path(weights_dir) if weights_dir else None
    out = absolute_path(out) if out is not None else None
    record = {} if isinstance(config, TrialConfig) else load_yaml(config)
    if threads is None:
        recorded = record.get("threads")
        threads = recorded if isinstance(recorded, int) and recorded > 0 else None
    index = training_index(
        data, record, seed=seed, val_fraction=val_fraction, allow_changed_data=allow_changed_data,
        source=str(config) if record else "config",
    )

    def show(m: dict[str, Any]) -> None:
        if progress:
            print(
                f"epoch {m['epoch']}/{cfg.epochs}  train_loss {m['train_loss']:.4f}  val_loss {m['val_loss']:.4f}"
                f"  val_acc {m['val_acc']:.4f}  {m['epoch_seconds']:.1f}s  {m['images_per_s']:.0f} img/s",
                file=sys.stderr, flush=True,
            )

    if progress:
        print(
            f"training {cfg.backbone} (freeze_depth {cfg.freeze_depth}, {cfg.augmentation}) on "
            f"{len(index.train)} train / {len(index.val)} val images, {len(index.classes)} classes",
            file=sys.stderr, flush=True,
        )
    result = fine_tune(
        cfg, index, report=show, weights_dir=weights_dir, cache=cache, train_on_val=full,
        keep_model=out is not None, device=device, threads=threads,
    )
    if progress:
        print(
            f"{result.params_trainable:,} of {result.params_total:,} parameters trainable",
            file=sys.stderr, flush=True,
        )
    final = result.final
    summary = {
        "val_acc": final["val_acc"],
        "val_loss": final["val_loss"],
        "val_balanced_acc": final["val_balanced_acc"],
        "val_macro_f1": final["val_macro_f1"],
        "best_val_acc": final["best_val_acc"],
        "epochs": len(result.history),
        "seconds": round(result.seconds, 2),
        "params_total": result.params_total,
        "params_trainable": result.params_trainable,
        "latency_ms": round(result.latency_ms, 3),
        "model_dir": None,
    }
    if out is not None:
        summary["model_dir"] = str(Path(
            save_model(result, out, record={"dataset": index.source, "dataset_fingerprint": index.fingerprint,
                                            "split": index.split_spec.to_dict(), "full_fit": full})
        ).resolve())
    return summary
