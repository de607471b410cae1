"""Members' predictions on validation and held-out images, each computed once.

Every member (a kept trial, or a soup of trials of one backbone) sees the images as the shipped
module will: decoded at the pool's largest decode size (the canvas), then its own resize, crop and
normalisation (`MemberNet`). Its validation logits, plain view, come from the file its trial kept
when the trial decoded at that same size; everything else is one forward pass, cached here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from search.config import TrialConfig
from search.ensemble._module import EnsembleNet, MemberNet, MemberSpec, build_member
from search.ensemble._soup import (
    average_state_dicts,
    batchnorm_differs,
    recompute_batchnorm,
)

if TYPE_CHECKING:
    from search.data import DatasetIndex


@dataclass(frozen=True)
class PoolTrial:
    """A kept COMPLETE trial: what an ensemble may use."""

    number: int  # the Optuna trial number
    config: TrialConfig  # the config it ran
    checkpoint: str  # its final weights (a state_dict of the whole model)


def member_spec(trial: PoolTrial, *, mean: Sequence[float], std: Sequence[float], trials: Sequence[int] | None = None,
                name: str | None = None) -> MemberSpec:
    """A trial's member description: its backbone, decode and crop sizes, and its weights' normalisation."""
    from search.data import stored_size

    cfg = trial.config
    return MemberSpec(
        name=name or f"trial {trial.number}", trials=tuple(trials or (trial.number,)), backbone=cfg.backbone,
        dropout=cfg.dropout, image_size=cfg.image_size, resize_size=stored_size(cfg.image_size),
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
    )


def _trial_network(trial: PoolTrial, num_classes: int) -> tuple[torch.nn.Module, MemberSpec]:
    """A kept trial's network with its final weights, and its member description."""
    from search.model_io import load_trained

    bb = load_trained(trial.config, num_classes, trial.checkpoint,
                      what=f"checkpoint {trial.checkpoint} of trial {trial.number}")
    return bb.model.eval(), member_spec(trial, mean=bb.mean, std=bb.std)


class Predictions:
    """Logits of members on the index's val and test images (and BatchNorm data for soups).

    Args:
        pool: the kept trials.
        index: the dataset, scanned on the study's split.
        device: where forward passes run.
        batch_size: images per forward pass.
        bn_images: training images used to recompute a soup's BatchNorm statistics.
        cache_dir: the decoded-image cache folder (None: the default).
    """

    def __init__(self, pool: Sequence[PoolTrial], index: DatasetIndex, *, device: torch.device,
                 batch_size: int = 64, bn_images: int = 512, cache_dir: str | None = None) -> None:
        self.index = index
        self.device = device
        self.batch_size = batch_size
        self.bn_images = bn_images
        self.cache_dir = cache_dir
        self.num_classes = len(index.classes)
        self.trials = {t.number: t for t in pool}
        self.specs: dict[str, MemberSpec] = {}
        self.states: dict[str, dict[str, torch.Tensor]] = {}
        networks = {}
        for t in pool:
            networks[t.number], spec = _trial_network(t, self.num_classes)
            self.specs[spec.name] = spec
            self.states[spec.name] = {k: v.detach().clone() for k, v in networks[t.number].state_dict().items()}
        self.canvas = max(s.resize_size for s in self.specs.values())
        self.labels = {"val": torch.tensor([y for _, y in index.val], dtype=torch.long),
                       "test": torch.tensor([y for _, y in index.test], dtype=torch.long)}
        self._modules: dict[str, MemberNet] = {
            self.trial_key(n): MemberNet(net, self.specs[self.trial_key(n)], canvas=self.canvas).to(device).eval()
            for n, net in networks.items()
        }
        self._logits: dict[tuple[str, str, bool], torch.Tensor] = {}
        for t in pool:
            self._use_kept_logits(t)

    def trial_key(self, number: int) -> str:
        return f"trial {number}"

    def _use_kept_logits(self, t: PoolTrial) -> None:
        from search.model_io import load_val_logits

        key = self.trial_key(t.number)
        kept = load_val_logits(t.checkpoint)
        if kept is None or self.specs[key].resize_size != self.canvas:
            return  # none kept, or the trial saw the images at another size than the ensemble will
        logits, labels = kept
        if logits.shape == (len(self.labels["val"]), self.num_classes) and torch.equal(labels, self.labels["val"]):
            self._logits[(key, "val", False)] = logits

    def soup_key(self, trials: Sequence[int]) -> str:
        """The member made of these trials' averaged weights (one trial: that trial itself)."""
        if len(trials) == 1:
            return self.trial_key(trials[0])
        first = self.trials[trials[0]]
        key = f"soup {first.config.backbone} {list(trials)}"
        if key not in self.specs:
            states = [self.states[self.trial_key(t)] for t in trials]
            base = self.specs[self.trial_key(trials[0])]
            spec = member_spec(first, mean=base.mean, std=base.std, trials=trials, name=key)
            module = build_member(spec, average_state_dicts(states), self.num_classes, canvas=self.canvas)
            module = module.to(self.device)
            differ = batchnorm_differs(states, module.model)
            recompute_batchnorm(module, [f"model.{n}" if n else "model" for n in differ], self._bn_batches())
            self.specs[key], self._modules[key] = spec, module.eval()
            self.states[key] = {k: v.cpu() for k, v in module.model.state_dict().items()}
        return key

    def module(self, key: str) -> MemberNet:
        """The member's module (on the device, eval mode)."""
        if key not in self._modules:
            self._modules[key] = build_member(self.specs[key], self.states[key], self.num_classes,
                                              canvas=self.canvas).to(self.device).eval()
        return self._modules[key]

    def logits(self, key: str, split: str, *, flip: bool = False) -> torch.Tensor:
        """A member's logits (float32, CPU) on every image of `split` ("val" or "test")."""
        k = (key, split, flip)
        if k not in self._logits:
            module = self.module(key)
            outs = []
            with torch.no_grad():
                for x in self._batches(split):
                    x = torch.flip(x, dims=[3]) if flip else x
                    outs.append(module(x).float().cpu())
            self._logits[k] = torch.cat(outs) if outs else torch.zeros(0, self.num_classes)
        return self._logits[k]

    def probs(self, key: str, split: str, *, tta: bool = False) -> torch.Tensor:
        """A member's probabilities; with TTA, averaged over the image and its mirror image."""
        p = self.logits(key, split).softmax(1)
        if tta:
            p = 0.5 * (p + self.logits(key, split, flip=True).softmax(1))
        return p

    def output(self, members: Sequence[tuple[str, float]], split: str, *, tta: bool) -> torch.Tensor:
        """What `EnsembleNet` returns before the temperature: log of the weighted mean probability."""
        total = sum(w for _, w in members)
        probs = sum(self.probs(k, split, tta=tta) * (w / total) for k, w in members)
        return probs.clamp_min(1e-12).log()  # type: ignore[union-attr]

    def network(self, members: Sequence[tuple[str, float]], *, tta: bool, temperature: float) -> EnsembleNet:
        """The module of a candidate (sharing the members' modules)."""
        return EnsembleNet([self.module(k) for k, _ in members], [w for _, w in members], tta=tta,
                           temperature=temperature).eval()

    def params(self, key: str) -> int:
        return sum(v.numel() for k, v in self.states[key].items() if v.is_floating_point())

    def _dataset(self, samples: Sequence[tuple[str, int]]) -> torch.utils.data.Dataset:
        from search.data import ImageDataset

        return ImageDataset(samples, size=self.canvas, cache=True, cache_dir=self.cache_dir)

    def _batches(self, split: str) -> Iterator[torch.Tensor]:
        samples = self.index.val if split == "val" else self.index.test
        loader = torch.utils.data.DataLoader(self._dataset(samples), batch_size=self.batch_size, shuffle=False)
        for x, _ in loader:
            yield x.to(self.device).float() / 255.0

    def _bn_batches(self) -> Iterator[torch.Tensor]:
        # Training images, never validation or test: the statistics are part of the weights. In
        # the seeded shuffled order, not by path: class folders sort by class, and batches of one
        # class would make the running variance the within-class one (momentum None averages the
        # batches' own variances).
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(len(self.index.train), generator=g)[: self.bn_images].tolist()
        samples = [self.index.train[i] for i in order]
        loader = torch.utils.data.DataLoader(self._dataset(samples), batch_size=self.batch_size, shuffle=False)
        for x, _ in loader:
            yield x.to(self.device).float() / 255.0
