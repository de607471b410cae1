"""tlsearch: backbone and hyperparameter search for transfer learning in image classification.

`import search` stays cheap: the heavy modules (torch, ray, plotly) load on first use.
"""

from __future__ import annotations

from typing import Any

from search.config import ConfigError, TLSearchError, TrialConfig
from search.settings import SearchSettings

__version__ = "0.1.0"

# Public API, loaded lazily: name -> module that defines it.
_LAZY = {
    "run_search": "search.runner",
    "resume_search": "search.runner",
    "load_study": "search.studies",
    "leaderboard": "search.studies",
    "list_studies": "search.studies",
    "write_report": "search.report",
    "export_trial": "search.export",
    "train": "search.trial",
    "fine_tune": "search.trial",
    "predict": "search.export",
    "scan_dataset": "search.data",
    "list_backbones": "search.backbones",
    "build_ensemble": "search.ensemble",
    "evaluate_model": "search.ensemble",
    "fit": "search.pipeline",
}

__all__ = ["ConfigError", "SearchSettings", "TLSearchError", "TrialConfig", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'search' has no attribute {name!r}")
