"""Part l: where the time of the first probe goes, from a cold start.

    python -m benchmarks.coldstart [--data DIR] [--trials 2] [--repeats 2]

A fresh process runs `run_search` on DATA with the default space at hand (the backbones of
../shared/weights), only its first linear probes (`--trials`), every cache empty (a fresh cache
folder), as `tlsearch run DATA --weights-dir ../shared/weights` does. Times are taken from the
moment the process is launched: its imports, then the run's set-up (scan, checks, Ray start, the
worker and its imports) until the trial function is entered, then inside each trial the backbone
build, the image-cache build (decode), the feature pass (forward) and the first epoch's report. Both ways of running the probes are measured, interleaved: at once
with one CPU each (the default), and one at a time with every CPU (`probes_all_cpus`).
Goal (issue: a faster cold start): the first probe's score within 20 s of the launch.
Writes benchmarks/results/coldstart-DATA.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results"

CHILD = """
import json, sys, time
t_python = time.time()
from functools import partial
from search.runner import run_search
from search.settings import SearchSettings
from benchmarks import _trials
t_imports = time.time()
data, work, trials, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
s = SearchSettings(study="cold", data=data, weights_dir=sys.argv[5], studies_dir=work + "/studies",
                   reports_dir=work + "/reports", cache_dir=work + "/cache", trials=trials, seed=0,
                   probes_all_cpus=sys.argv[6] == "1")
summary = run_search(s, trial_fn=partial(_trials.phased_fine_tune, log_path=log), progress=False)
print(json.dumps({"python_started": t_python, "imports_done": t_imports, "run_search_returned": time.time(),
                  "best": summary.best_value}))
"""


def one_run(data: str, trials: int, probes_all_cpus: bool) -> dict:
    """One cold run in a fresh process and fresh folders; phases in seconds from the launch."""
    with tempfile.TemporaryDirectory() as work:
        log = Path(work) / "phases.jsonl"
        env = {**os.environ, "PYTHONPATH": str(REPO), "TLSEARCH_CACHE": str(Path(work) / "cache")}
        t_launch = time.time()
        out = subprocess.run([sys.executable, "-c", CHILD, data, work, str(trials), str(log), str(SHARED / "weights"),
                              str(int(probes_all_cpus))],
                             capture_output=True, text=True, env=env, cwd=work)
        if out.returncode != 0:
            raise SystemExit(f"cold run failed:\n{out.stderr[-3000:]}")
        top = json.loads(out.stdout.strip().splitlines()[-1])
        events = [json.loads(line) for line in log.read_text().splitlines()]

    def rel(t: float) -> float:
        return round(t - t_launch, 2)

    trials_seen: dict[str, dict] = {}
    for e in events:
        tr = trials_seen.setdefault(e["trial"], {"backbone": e["backbone"], "phases": []})
        if e["event"] == "trial function entered":
            tr["entered_s"] = rel(e["start"])
        elif e["event"].startswith("epoch "):
            tr.setdefault("first_report_s", rel(e["end"]))
            tr.setdefault("first_val_acc", e.get("val_acc"))
        else:
            tr["phases"].append({"event": e["event"], "start_s": rel(e["start"]), "seconds": round(e["end"] - e["start"], 2)})
    first = min(trials_seen.values(), key=lambda t: t.get("first_report_s", 1e9))
    return {"probes_all_cpus": probes_all_cpus, "python_start_s": rel(top["python_started"]), "imports_done_s": rel(top["imports_done"]),
            "first_trial_entered_s": min(t["entered_s"] for t in trials_seen.values()),
            "first_score_s": first.get("first_report_s"), "first_score_backbone": first["backbone"],
            "first_val_acc": first.get("first_val_acc"),
            "last_score_s": max(t.get("first_report_s", 0) for t in trials_seen.values()), "run_ended_s": rel(top["run_search_returned"]),
            "trials": list(trials_seen.values()), "load_end": [round(x, 2) for x in os.getloadavg()]}


def phase_totals(run: dict) -> dict[str, float]:
    """Seconds per phase kind in the trial that scored first."""
    first = min(run["trials"], key=lambda t: t.get("first_report_s", 1e9))
    totals: dict[str, float] = {}
    for p in first["phases"]:
        totals[p["event"]] = round(totals.get(p["event"], 0.0) + p["seconds"], 2)
    return totals


def markdown(result: dict) -> str:
    runs = result["runs"]
    lines = ["# Cold start: the first probe's score (part l)\n",
             f"{Path(result['data']).name}, the default space at hand (weights in ../shared/weights), its first "
             f"{result['trials']} linear probes at once, every cache empty, {result['cpus']} CPUs. Seconds from the "
             f"process's launch. Goal: first score within 20 s.\n",
             "| run | probes | imports done | first trial entered | first score | of | val_acc | every probe scored | phases of the first-scored trial (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs, 1):
        phases = "; ".join(f"{k} {v}" for k, v in phase_totals(r).items())
        how = "one at a time, every CPU" if r["probes_all_cpus"] else "at once, one CPU each"
        lines.append(f"| {i} | {how} | {r['imports_done_s']} | {r['first_trial_entered_s']} | **{r['first_score_s']}** | "
                     f"{r['first_score_backbone']} | {r['first_val_acc']:.3f} | {r['last_score_s']} | {phases} |")
    lines.append(f"\nLoad at the end of each run: {[r['load_end'] for r in runs]}.\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(SHARED / "data" / "spoken_digits"))
    ap.add_argument("--trials", type=int, default=2, help="the first N trials: the probes")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if not (SHARED / "weights").is_dir():
        print(f"skipped: {SHARED}/weights is needed", file=sys.stderr)
        return 0
    # The two ways of running the probes, interleaved.
    runs = [one_run(args.data, args.trials, all_cpus) for _ in range(args.repeats) for all_cpus in (False, True)]
    result = {"data": args.data, "trials": args.trials, "cpus": os.cpu_count(), "runs": runs}
    from benchmarks._common import write_results

    write_results(args.out, f"coldstart-{Path(args.data).name}{args.tag}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
