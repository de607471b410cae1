"""The table of a benchmarks/bench.py run (parts a-f, h): one row per measured part.
"""

from __future__ import annotations


from benchmarks._common import fmt, met
from benchmarks.imbalance import KEEP_ONE_IN


def markdown(results: dict) -> str:
    """The results as a markdown table (one row per measured part) plus the run's conditions."""
    m = results["machine"]
    lines = [
        f"Run {results['finished']} ({'quick' if results['quick'] else 'full'}), {m['cpus']} CPUs, no GPU, "
        f"load average {m['load_start']} at start / {m['load_end']} at end; torch {m['torch']}.",
        "",
        "| part | tlsearch | baseline | ratio | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    p = results["parts"]
    if "a" in p:
        a = p["a"]
        lines.append(
            f"| a. time to val_acc ≥ {a['target_val_acc']} ({a['budget_s']:.0f} s budget; best acc in budget) "
            f"| {fmt(a['tlsearch']['time_to_target_s'], 1)} s ({a['tlsearch']['best_val_acc']:.3f}; "
            f"{a['tlsearch']['trials']} trials) "
            f"| hand-written: {fmt(a['handwritten']['time_to_target_s'], 1)} s ({a['handwritten']['best_val_acc']:.3f}; "
            f"{a['handwritten']['trials']} trials) | "
            + (f"{fmt(a['ratio'])}×" if a.get("ratio") is not None or a.get("ratio_upper_bound") is None
               else f"< {fmt(a['ratio_upper_bound'])}× (hand-written missed the target)")
            + f" | ≤ 0.3× | {met(a['met'])} |")
    if "b" in p:
        b = p["b"]
        r = b["runs"]
        lines.append(
            f"| b. head-only trial, training time (val_acc) | warm: {r['later trial (cache warm)']['train_s']:.2f} s "
            f"({r['later trial (cache warm)']['val_acc']:.3f}); first trial incl. cache build: "
            f"{r['first trial (builds caches)']['trial_s']:.1f} s | no cache: {r['no cache']['train_s']:.1f} s "
            f"({r['no cache']['val_acc']:.3f}) | {b['ratio']:.0f}× less (whole trial: warm {b['ratio_trial_wall_warm']:.1f}×, "
            f"first {b['ratio_trial_wall_first']:.1f}×) | ≥ 10×, Δacc ≤ 0.02 | {met(b['met'])} |")
        if "partial_freeze" in b:
            pf = b["partial_freeze"]
            f, n = pf["runs"]["first trial (builds caches)"], pf["runs"]["no cache"]
            lines.append(
                f"| b (partial). freeze_depth {pf['freeze_depth']} trial, whole trial wall (val_acc) "
                f"| boundary cache, first trial incl. build: {f['trial_s']:.1f} s ({f['val_acc']:.3f}) "
                f"| no cache: {n['trial_s']:.1f} s ({n['val_acc']:.3f}) | {pf['ratio_trial_wall']:.1f}× less | — | — |")
    if "c" in p:
        c = p["c"]
        lines.append(
            f"| c. images/s, one pass, {c['images']} images | cache: {c['cached_images_per_s']:.0f} "
            f"(build once: {c['cache_build_s']:.1f} s) | PIL decode: {c['pil_images_per_s']:.0f} | {c['ratio']:.1f}× "
            f"| ≥ 3× | {met(c['met'])} |")
    if "d" in p:
        d = p["d"]
        many, few, fresh = d["many"], d["few"], d["few, fresh worker per trial"]

        def where(r: dict) -> str:
            return (f"{r['overhead']:.1%}: start-up {r['before_first_trial_s']:.1f} s once, "
                    f"{fmt(r['between_trials_s'])} s between trials, idle tail {r['idle_tail_slot_s']:.1f} slot-s")

        lines.append(
            f"| d. orchestration overhead, {many['trials']} short trials (~{many['compute_s'] / max(1, many['trials']):.1f} s "
            f"each, {many['concurrency']} at a time) | {where(many)} "
            f"| {fresh['trials']} trials, fresh worker per trial: {fresh['overhead']:.1%} "
            f"({fresh['per_trial_overhead_s']:.1f} s/trial vs {few['per_trial_overhead_s']:.1f} reusing workers) "
            f"| — | ≤ 10% | {met(d['met'])} |")
        lines.append(
            f"| d (few). the same, only {few['trials']} trials | {where(few)} | — | — | (start-up's share) | — |")
    if "e" in p:
        e = p["e"]
        keys = [k for k in e if " x " in k]
        lines.append(
            f"| e. {e['trials']} identical trials, wall | {keys[1]}: {e[keys[1]]['wall_s']:.1f} s "
            f"| {keys[0]}: {e[keys[0]]['wall_s']:.1f} s | {e['speedup_per_cpu_trials']:.2f}× | (sets the default) | — |")
    if "f" in p:
        f = p["f"]
        cells = "; ".join(f"{r['images']:,} images: {r['first_trial']['peak_rss_mb'] / 1024:.2f} GB "
                          f"(anon {r['first_trial']['peak_anon_mb'] / 1024:.2f})" for r in f["runs"])
        warm = f["runs"][-1]["warm_trial"]["peak_rss_mb"] / 1024
        lines.append(
            f"| f. peak memory, first head-only trial (builds the caches), {f['image_size']} px | {cells} "
            f"| warm trial at {f['runs'][-1]['images']}: {warm:.2f} GB | — | ≤ 1.2 × smallest + features "
            f"({f['allowed_mb'] / 1024:.2f} GB) | {met(f['met'])} |")
    if "h" in p:
        g = p["h"]
        w, wo = g["runs"]["with imbalance handling"], g["runs"]["without"]
        seeds = ", ".join(f"{a['best_val_macro_f1']:.3f}/{b['best_val_macro_f1']:.3f}" for a, b in zip(w, wo)
                          if a["best_val_macro_f1"] is not None and b["best_val_macro_f1"] is not None)
        train = g["counts"]["train"]
        lines.append(
            f"| h. best val_macro_f1, hymenoptera with bees cut to 1 in {KEEP_ONE_IN} in train "
            f"({', '.join(f'{k} {v}' for k, v in train.items())}), {len(w)} seeds × {g['plan']['trials']} trials "
            f"| with imbalance handling: {g['mean_val_macro_f1']['with imbalance handling']:.3f} "
            f"| without: {g['mean_val_macro_f1']['without']:.3f} (per seed with/without: {seeds}) "
            f"| {g['gain_points']:+.1f} points | ≥ +2 points | {met(g['met'])} |")
    lines.append("")
    lines.append("Ratios: a = tlsearch / hand-written time; b, c = baseline / tlsearch; "
                 "e = (1 trial x all CPUs) / (1 trial per CPU) wall time. Raw figures: "
                 "`benchmarks/results/latest.json`.")
    return "\n".join(lines) + "\n"
