"""Makes docs/img/report.png: the report of a tiny generated study, shot with headless Chromium.

    python docs/_scripts/screenshot.py [--out docs/img/report.png]

A tiny ImageFolder of shapes (3 classes), a search of 8 trials on it in which every trial's training
is the fast stand-in of the tests (tests/reliability/stubs.py: the commands, study and report are
the real ones, the accuracies made up), `tlsearch report`, then Debian's `chromium --headless
--screenshot` with the network off. The PNG is kept under 300 KB (palette-quantised when needed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 300 * 1024
SPACE = """\
backbone: [resnet18]
pretrained: false
freeze_depth: [0, 2, all]
augmentation: [none, flip]
lr: {low: 1.0e-4, high: 1.0e-2, log: true}
image_size: 32
batch_size: 8
max_epochs: 4
"""


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise SystemExit("needs Debian chromium (apt-get install -y chromium)")
    return found


def make_report(work: Path) -> Path:
    """A tiny study searched with stand-in trials; returns its report page."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_image_folder

    make_image_folder(work / "shapes", splits=("train", "val"), per_class=8, size=32)
    (work / "space.yaml").write_text(SPACE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "TLSEARCH_CACHE": str(work / "cache"), "STUB_EPOCH_S": "0.05", "OMP_NUM_THREADS": "2"}
    cli = [sys.executable, "-m", "reliability.stubcli"]
    subprocess.run([*cli, "run", "shapes", "--study", "shapes", "--space", "space.yaml", "--trials", "8",
                    "--no-progress"], cwd=work, env=env, check=True)
    subprocess.run([*cli, "report", "shapes"], cwd=work, env=env, check=True)
    return work / "reports" / "shapes" / "index.html"


def shoot(page: Path, out: Path, work: Path) -> None:
    """Headless Chromium, network off, one 1280x900 screenshot of the page's top."""
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--disable-background-networking", "--no-first-run", "--disable-extensions",
                    "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={work / 'profile'}",
                    "--virtual-time-budget=8000", "--window-size=1280,900", f"--screenshot={out}",
                    page.as_uri()], check=True, capture_output=True, timeout=180)
    if out.stat().st_size > LIMIT:
        from PIL import Image

        Image.open(out).convert("RGB").quantize(colors=128).save(out, optimize=True)
    if out.stat().st_size > LIMIT:
        raise SystemExit(f"{out} is {out.stat().st_size // 1024} KB, over {LIMIT // 1024} KB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python docs/_scripts/screenshot.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "img" / "report.png"))
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tlsearch-shot-") as tmp:
        work = Path(tmp)
        shoot(make_report(work), out, work)
    print(f"{out} ({out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
