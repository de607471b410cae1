"""Shared fixtures: tiny generated ImageFolders and the optional ../shared folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Keep torch and friends from oversubscribing the small CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (real data and weights); skips where it is absent."""
    if not (SHARED / "data" / "hymenoptera").is_dir():
        pytest.skip(f"needs ../shared with real data and weights, not found at {SHARED}")
    return SHARED


def make_image_folder(
    root: Path,
    *,
    classes: tuple[str, ...] = ("circle", "square", "triangle"),
    per_class: int = 6,
    size: int = 40,
    splits: tuple[str, ...] = ("train", "val"),
    seed: int = 0,
) -> Path:
    """Writes a tiny ImageFolder of coloured shapes; classes are easy to tell apart.

    Args:
        root: folder to create.
        classes: class folder names.
        per_class: images per class and split.
        size: image side in pixels.
        splits: split folders to make; () makes class folders directly under root.
        seed: random seed for positions and colours.

    Returns:
        root.
    """
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    for split in splits or ("",):
        for ci, name in enumerate(classes):
            d = root / split / name if split else root / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = Image.new("RGB", (size, size), tuple(rng.randrange(0, 80) for _ in range(3)))
                draw = ImageDraw.Draw(img)
                r = rng.randrange(size // 5, size // 3)
                cx, cy = rng.randrange(r, size - r), rng.randrange(r, size - r)
                colour = tuple(rng.randrange(150, 256) for _ in range(3))
                kind = ci % 3
                if kind == 0:
                    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
                elif kind == 1:
                    draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
                else:
                    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
                img.save(d / f"{name}_{i}.png")
    return root


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray session for every test (of any file) that runs a search in-process."""
    import tempfile

    ray = pytest.importorskip("ray")
    tests = Path(__file__).resolve().parent
    paths = [str(ROOT), str(tests), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)  # workers import `search` and the test modules
    os.environ["OMP_NUM_THREADS"] = "1"
    temp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    yield
    ray.shutdown()


@pytest.fixture()
def tiny_dataset(tmp_path: Path) -> Path:
    """A 3-class train/val ImageFolder of 40x40 PNGs, 6 per class and split."""
    return make_image_folder(tmp_path / "data")
