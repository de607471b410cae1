"""`BackboneSource`: the one interface behind which torchvision and timm each provide backbones.

A source answers, for the names it owns: the registry entry (`spec`), the network with random
weights (`create`) or with the weights of a file it cached (`load_cached`), where the classifier
is (`remove_classifier`), what the weights expect of an image (`preprocessing`), and where its
pretrained weights live (`cached`, `expected_location`) or come from (`download`). The stage
layout travels in the spec. `search.backbones._registry.source_of` picks the source of a name.
"""

from __future__ import annotations

import abc
from pathlib import Path

from torch import nn

from search.backbones._types import BackboneSpec, Preprocessing, WeightsError
from search.backbones._weights import _load_file


class BackboneSource(abc.ABC):
    """A family of backbones from one library, each named `<prefix><model name>`."""

    prefix: str = ""  # what names owned by this source start with ("" or e.g. "timm/")

    @property
    @abc.abstractmethod
    def hint(self) -> str:
        """The names this source accepts, for an "unknown backbone" message."""

    @abc.abstractmethod
    def owns(self, name: str) -> bool:
        """Whether `name` is this source's to build (it may still refuse it in `spec`)."""

    @abc.abstractmethod
    def names(self, pattern: str) -> list[str]:
        """Names of this source matching a shell-style pattern; [] for a pattern not its own."""

    @abc.abstractmethod
    def spec(self, name: str) -> BackboneSpec:
        """The registry entry of an owned name; ConfigError when the library has no such model."""

    @abc.abstractmethod
    def create(self, spec: BackboneSpec) -> nn.Module:
        """The full network with its original classifier and random weights."""

    @abc.abstractmethod
    def remove_classifier(self, net: nn.Module, spec: BackboneSpec) -> int:
        """Replaces the classifier so that net(x) is pooled features; returns their width."""

    @abc.abstractmethod
    def preprocessing(self, spec: BackboneSpec, net: nn.Module) -> Preprocessing:
        """What the pretrained weights expect of an image."""

    @abc.abstractmethod
    def cached(self, name: str) -> Path | None:
        """The pretrained checkpoint already on disk in the library's cache, or None."""

    @abc.abstractmethod
    def expected_location(self, name: str) -> str:
        """Where the library's cache would hold the weights, for a "missing weights" message."""

    @abc.abstractmethod
    def download(self, name: str) -> Path:
        """Fetches the pretrained checkpoint into the cache, failing fast with WeightsError."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prefix={self.prefix!r})"

    def load_cached(self, spec: BackboneSpec, path: Path) -> nn.Module:
        """The full network with the weights of a checkpoint from this source's cache.

        The file is read safely (`_read_state`) and loaded strictly, never through a library
        loader that would unpickle it.
        """
        net = self.create(spec)
        _load_file(net, path, spec.name)
        return net

    def file_stem(self, name: str) -> str:
        """The weights file name (without .pth) in --weights-dir: the model name, no prefix."""
        return name[len(self.prefix):] if name.startswith(self.prefix) else name

    def missing(self, name: str, why: str) -> WeightsError:
        """The error for weights that are neither cached nor fetchable, saying where to put them."""
        return WeightsError(
            f"no pretrained weights for {name}: not in {self.expected_location(name)} and {why}; "
            f"put a state_dict at DIR/{self.file_stem(name)}.pth and pass --weights-dir DIR, "
            f"or use --no-pretrained"
        )
