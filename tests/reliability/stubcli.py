"""`tlsearch` exactly as users run it, except that every trial runs `stubs.stub_trial`.

python -m reliability.stubcli run DATA --study NAME ...   (tests/ on PYTHONPATH)
"""

from __future__ import annotations

import sys

from search import cli, runner
from reliability.stubs import stub_trial

_real_run_search = runner.run_search


def _run_search(settings, **kw):  # noqa: ANN001
    kw["trial_fn"] = kw.get("trial_fn") or stub_trial
    return _real_run_search(settings, **kw)


runner.run_search = _run_search  # cmd_run imports it at call time; resume_search looks it up here

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
