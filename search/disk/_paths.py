"""Where the files that go with a trial checkpoint live, so that whatever removes or counts one
also finds the others."""

from __future__ import annotations

import os
from pathlib import Path


def logits_path(checkpoint_path: str | os.PathLike) -> Path:
    """Where a trial's validation logits live: beside its checkpoint (`trial-3.pt` ->
    `trial-3.val-logits.pt`), so the checkpoint bound keeps or removes both together.

    Args:
        checkpoint_path: the trial's checkpoint file.

    Returns:
        The logits file's path (it may not exist).
    """
    p = Path(checkpoint_path)
    return p.with_name(f"{p.stem}.val-logits{p.suffix or '.pt'}")
