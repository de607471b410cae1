"""mkdocs hook: the benchmark pages (benchmarks/*.md), generated from benchmarks/results/.

Every results file `NAME.json` (with the `NAME.md` table its benchmark wrote beside it) becomes one
figure on the page of its part, headed by where it comes from: the date (the file's `finished`
field, else the date of the commit that recorded the file), the commit that recorded it (git log),
the machine (the JSON's `cpus`, torch and platform where recorded) and the command that makes it
(from the part's module and what the file records of its options). Nothing is copied by hand, so a
figure cannot go stale silently: rerun the command and the page follows.
"""

from __future__ import annotations

import ast
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
INDEX = "benchmarks/index.md"


@dataclass(frozen=True)
class Part:
    """One benchmark page: which results files it holds and the module that makes them."""

    slug: str  # page name under benchmarks/
    title: str
    module: str  # python -m benchmarks.<module>
    prefixes: tuple[str, ...]  # results files whose stem starts with one of these


PARTS = (
    Part("overview", "Caches, overhead, memory, imbalance (parts a-f, h)", "bench", ("latest", "partial")),
    Part("defaults", "The search against the old defaults and a plain search (part g)", "defaults", ("defaults",)),
    Part("ensembles", "Ensembles and soups (part i)", "ensembles", ("ensembles",)),
    Part("parity", "The trainer against a plain loop (part j)", "parity", ("parity",)),
    Part("cores", "Cores to the fine-tune that matters (part k)", "cores", ("cores",)),
    Part("coldstart", "The cold start (part l)", "coldstart", ("coldstart",)),
    Part("fit", "tlsearch fit (part m)", "fit", ("fit",)),
    Part("gpu", "The GPU path", "gpu", ("gpu",)),
    Part("fairness", "Fair fine-tunes: early stopping, and fit against the hand-written search", "fairness",
         ("fairness",)),
)


@dataclass(frozen=True)
class Figure:
    """One results file and where it comes from."""

    stem: str
    date: str
    commit: str
    machine: str
    command: str
    data: str  # the data as the file names it
    table: str  # the markdown its benchmark wrote (NAME.md), or a note that there is none


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def part_of(stem: str) -> Part:
    """The page a results file belongs to; an unknown prefix gets a page of its own module."""
    for part in PARTS:
        if any(stem == p or stem.startswith(p + "-") for p in part.prefixes):
            return part
    prefix = stem.split("-", 1)[0]
    return Part(prefix, f"benchmarks/{prefix}.py", prefix, (prefix,))


def _data_arg(data: str | None) -> str:
    if not data:
        return ""
    name = Path(str(data).split(" ", 1)[0]).name
    return f" --data ../shared/data/{name}"


def command(stem: str, d: dict) -> str:
    """The command that writes this results file, from what the file records."""
    part = part_of(stem)
    if part.slug == "overview":
        parts = "".join(sorted(d.get("parts", {})))
        only = "" if stem == "latest" else f" --only {','.join(parts)}"
        return "python -m benchmarks.bench" + (" --quick" if d.get("quick") else "") + only
    if part.slug == "defaults":
        arms = d.get("arms") or ["old", "new"]
        cmd = f"python -m benchmarks.bench --defaults --arms {','.join(arms)}" + _data_arg(d.get("data"))
        cmd += f" --budget-s {d['budget_s']:g}" if d.get("budget_s") not in (None, 480, 480.0) else ""
        if d.get("plain_reused_from"):
            cmd += f" --reuse-plain {d['plain_reused_from']}"
        return cmd
    if part.slug == "ensembles":
        return "python -m benchmarks.bench --ensembles" + (" --quick" if d.get("quick") else "")
    if part.slug == "parity":
        cases = d.get("cases", [])
        arms = cases[0].get("arms", []) if cases else []
        c = cases[0]["case"] if cases else {}
        cmd = f"python -m benchmarks.parity --cases {','.join(x['case']['name'] for x in cases)} --arms {','.join(arms)}"
        cmd += f" --seeds {len(cases[0]['seeds'])}" if cases and len(cases[0].get("seeds", [])) != 3 else ""
        cmd += f" --batch-size {c['batch_size']}" if c.get("batch_size") == 16 else ""
        return cmd + f" --stem {stem}"
    if part.slug == "cores":
        return "python -m benchmarks.cores" + _data_arg(d.get("data")) + f" --image-size {d.get('image_size', 160)}"
    if part.slug == "coldstart":
        data = str(d.get("data", ""))
        tag = stem.removeprefix("coldstart-")
        arg = _data_arg(data) if "(" not in data else " --data DIR"  # DIR: the data the file describes
        return f"python -m benchmarks.coldstart{arg} --trials {d.get('trials', 2)}" + (f" --tag {tag}" if "(" in data else "")
    if part.slug == "fit":
        rows = d.get("rows", [])
        datasets = sorted({r["data"] for r in rows})
        presets = list(dict.fromkeys(r["preset"] for r in rows))
        budgets = ",".join(f"{p}={next(r['budget_s'] for r in rows if r['preset'] == p):g}" for p in presets)
        return f"python -m benchmarks.fit --datasets {','.join(datasets)} --presets {','.join(presets)} --budgets {budgets}"
    if part.slug == "fairness":
        if stem.startswith("fairness-replay"):
            c = d.get("case", {})
            return (f"python -m benchmarks.fairness --part replay --classes {c.get('classes', 10)} "
                    f"--per-class {c.get('per_class', 60)} --side {c.get('side', 64)}")
        rows = d.get("rows", [])
        datasets = ",".join(dict.fromkeys(r["data"] for r in rows))
        seeds = ",".join(str(s) for s in dict.fromkeys(r["seed"] for r in rows))
        base = "fairness-compare-" + datasets.replace(",", "-")
        tag = f" --tag {stem[len(base) + 1:]}" if stem.startswith(base + "-") else ""
        return (f"python -m benchmarks.fairness --part compare --datasets {datasets} --seeds {seeds} "
                f"--budget {d.get('budget_s', 300):g}{tag}")
    return f"python -m benchmarks.{part.module}"


def machine(d: dict) -> str:
    """The machine a results file was measured on, from what it records."""
    m = d.get("machine") if isinstance(d.get("machine"), dict) else {}
    cpus = m.get("cpus", d.get("cpus"))
    gpu = d.get("gpu") or m.get("gpu")
    words = [f"{cpus} CPUs" if cpus else "CPUs not recorded", str(gpu) if gpu else "no GPU"]
    if m.get("torch"):
        words.append(f"torch {m['torch']}")
    if m.get("load_end"):
        words.append(f"load average at the end {', '.join(f'{x:.1f}' for x in m['load_end'])}")
    elif d.get("load_end"):
        words.append(f"load average at the end {', '.join(f'{x:.1f}' for x in d['load_end'])}")
    return "; ".join(words)


def figure(path: Path) -> Figure:
    """The figure of one results file."""
    d = json.loads(path.read_text(encoding="utf-8"))
    rel = f"benchmarks/results/{path.name}"
    commit = _git("log", "-1", "--format=%h", "--", rel) or "not committed yet"
    date = d.get("finished") or _git("log", "-1", "--format=%ad", "--date=short", "--", rel) or "not recorded"
    md = path.with_suffix(".md")
    if md.exists():
        lines = md.read_text(encoding="utf-8").splitlines()
        # The file's own title becomes the figure's heading; its sections sit one level below.
        body = [("###" + ln[1:] if ln.startswith("## ") else ln) for ln in lines if not ln.startswith("# ")]
        table = "\n".join(body).strip()
    else:
        table = f"(no table beside it: the figures are in `{rel}`)"
    data = d.get("data") if isinstance(d.get("data"), str) else ""
    return Figure(path.stem, date, commit, machine(d), command(path.stem, d), data, table)


def figures() -> dict[str, list[Figure]]:
    """Every results file's figure, by page slug."""
    pages: dict[str, list[Figure]] = {}
    for path in sorted(RESULTS.glob("*.json")):
        pages.setdefault(part_of(path.stem).slug, []).append(figure(path))
    return pages


def _module_doc(module: str) -> str:
    src = ROOT / "benchmarks" / f"{module}.py"
    if not src.exists():
        return ""
    doc = ast.get_docstring(ast.parse(src.read_text(encoding="utf-8"))) or ""
    return doc.split("\n\n", 1)[0].strip()


def part_page(part: Part, figs: list[Figure]) -> str:
    lines = [f"# {part.title}", "",
             f"Made by `benchmarks/{part.module}.py`: {_module_doc(part.module)}", "",
             "Generated from `benchmarks/results/` when the site is built; each figure names the command",
             "that makes it again.", ""]
    for f in figs:
        lines += [f"## {f.stem}", "",
                  f"- **date** {f.date}; **commit** `{f.commit}` (the commit that recorded "
                  f"`benchmarks/results/{f.stem}.json`)",
                  f"- **machine** {f.machine}",
                  f"- **command** `{f.command}`",
                  *([f"- **data** {f.data}"] if f.data else []), "", f.table, ""]
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """Every generated benchmark page, by its path under docs/."""
    figs = figures()
    known = {p.slug: p for p in PARTS}
    out = {}
    index = ["# Benchmarks", "",
             "Every page here is generated from `benchmarks/results/` when the site is built: each figure",
             "is one results file, with its date, the commit that recorded it, the machine and the command",
             "that makes it again. How to run them: [Running the benchmarks](running.md).", "",
             "| page | figures | newest |", "|---|---|---|"]
    for slug, fs in figs.items():
        part = known.get(slug) or part_of(fs[0].stem)
        out[f"benchmarks/{slug}.md"] = part_page(part, fs)
        index.append(f"| [{part.title}]({slug}.md) | {len(fs)} | {max(f.date for f in fs)} |")
    out[INDEX] = "\n".join(index) + "\n"
    return out


def nav_entries() -> list[dict[str, str]]:
    entries = [{"Overview": INDEX}, {"Running the benchmarks": "benchmarks/running.md"}]
    known = {p.slug: p for p in PARTS}
    for slug, fs in figures().items():
        title = (known.get(slug) or part_of(fs[0].stem)).title
        entries.append({title: f"benchmarks/{slug}.md"})
    return entries


def on_config(config):  # noqa: ANN001, ANN201 - mkdocs hook signature
    for item in config["nav"] or []:
        if isinstance(item, dict) and "Benchmarks" in item:
            item["Benchmarks"] = nav_entries()
    return config


def on_files(files, config):  # noqa: ANN001, ANN201 - mkdocs hook signature
    from mkdocs.structure.files import File

    for path, content in pages().items():
        files.append(File.generated(config, path, content=content))
    return files
