"""How many bytes each cache folder may hold; beyond it, the least recently used files go first."""

from __future__ import annotations

import os

from search.config import TLSearchError

# Default budget of the whole images/ cache folder ($TLSEARCH_IMAGE_CACHE_BYTES overrides it): the
# least recently used arrays are removed to make room for a new one.
DEFAULT_IMAGE_BUDGET_BYTES = 16 * 1024**3
# The features/ cache folder is trimmed to this many bytes ($TLSEARCH_FEATURE_CACHE_BYTES).
FEATURE_BUDGET_BYTES = int(os.environ.get("TLSEARCH_FEATURE_CACHE_BYTES", 4 * 2**30))


def image_budget_bytes() -> int:
    """The images/ cache folder's budget: $TLSEARCH_IMAGE_CACHE_BYTES, else DEFAULT_IMAGE_BUDGET_BYTES.

    Returns:
        The budget in bytes, read from the environment on every call.
    """
    env = os.environ.get("TLSEARCH_IMAGE_CACHE_BYTES", "").strip()
    try:
        return int(float(env)) if env else DEFAULT_IMAGE_BUDGET_BYTES
    except ValueError:
        raise TLSearchError(f"TLSEARCH_IMAGE_CACHE_BYTES must be a number of bytes, got {env!r}") from None
