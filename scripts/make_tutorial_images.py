"""Regenerate the README tutorial's pictures from the product itself, so they stay true.

    .venv/bin/python scripts/make_tutorial_images.py [--model Resources/Models/demo] [--snapshots 2]

Runs exactly the README's batch command (``headct-molre batch`` on the bundled sample CT with the demo model,
in a temporary folder), copies its annotated snapshots to ``docs/images/tutorial_snapshot_N.png``, renders the
case's ``report.html`` to ``docs/images/tutorial_report.png`` in headless Chromium (skipped with a message
when Chromium is not installed, unless ``--require-chromium``), and rewrites the README block between
``<!-- tutorial-images:start -->`` and ``<!-- tutorial-images:end -->`` with the command and the pictures'
slice positions (RAS S, mm). Writes only into docs/images/ and README.md; the bundle and the sample are read.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = Path("Resources/Samples/GE_head_axial_1x1x5mm.nii.gz")
IMAGES = Path("docs/images")
START, END = "<!-- tutorial-images:start -->", "<!-- tutorial-images:end -->"
SNAPSHOT_NAME = re.compile(r"snapshot_(\d+)_S([+-]\d+(?:\.\d+)?)mm\.png$")


def run_batch(model: Path, snapshots: int, out: Path) -> Path:
    """The README's command, as a user runs it; returns the case folder."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "HeadCTMoLRE"))
    command = [sys.executable, "-m", "HeadCTMoLRELib.cli", "batch", str(SAMPLE), "--model", str(model),
               "--out", str(out), "--snapshots", str(snapshots)]
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    cases = [p for p in out.iterdir() if (p / "report.html").is_file()]
    if len(cases) != 1:
        raise SystemExit(f"expected one case folder with report.html in {out}, found {len(cases)}")
    return cases[0]


def snapshot_positions(case: Path) -> list[tuple[Path, float]]:
    """The case's snapshots in rank order with their slice position (RAS S, mm) read from the file name."""
    found = []
    for png in case.glob("snapshot_*.png"):
        match = SNAPSHOT_NAME.search(png.name)
        if match:
            found.append((int(match.group(1)), png, float(match.group(2))))
    return [(png, s_mm) for _, png, s_mm in sorted(found)]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page: Path, png: Path, browser: str, profile: Path) -> None:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--window-size=1150,1500",
               f"--screenshot={png.resolve()}", page.resolve().as_uri()]
    subprocess.run(command, check=True, capture_output=True, timeout=180)
    if not png.is_file() or png.stat().st_size == 0:
        raise SystemExit(f"Chromium wrote no screenshot of {page}")


def readme_block(model: Path, snapshots: list[tuple[str, float]], report_png: str | None) -> str:
    """The Markdown between the markers: the command, the snapshots (with their S position), the report."""
    lines = [START, "", "   ```bash",
             f"   .venv/bin/headct-molre batch {SAMPLE} \\",
             f"       --model {model} --out out/ --snapshots {len(snapshots)}", "   ```", ""]
    if snapshots:
        lines.append("   | " + " | ".join(f"snapshot {i} (S {s:+.1f} mm)" for i, (_, s) in enumerate(snapshots, 1)) + " |")
        lines.append("   |" + "---|" * len(snapshots))
        lines.append("   | " + " | ".join(f"![annotated snapshot {i}, S {s:+.1f} mm]({name})"
                                          for i, (name, s) in enumerate(snapshots, 1)) + " |")
    if report_png:
        lines += ["", f"   The case's `report.html` (self-contained, opens offline), as Chromium renders it:", "",
                  f"   ![report.html of the sample]({report_png})"]
    lines += ["", "   These pictures were made by `scripts/make_tutorial_images.py`, which runs the command above.", END]
    return "\n".join(lines)


def replace_block(readme: str, block: str) -> str:
    if readme.count(START) != 1 or readme.count(END) != 1:
        raise SystemExit(f"README.md must hold exactly one {START} ... {END} block")
    head, rest = readme.split(START)
    _, tail = rest.split(END)
    return head + block + tail


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("Resources/Models/demo"))
    parser.add_argument("--snapshots", type=int, default=2)
    parser.add_argument("--require-chromium", action="store_true", help="fail when Chromium is missing")
    args = parser.parse_args(argv)
    browser = chromium()
    if browser is None and args.require_chromium:
        raise SystemExit("Chromium is not installed (Debian: apt-get install chromium)")
    images = ROOT / IMAGES
    images.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="headct-tutorial-") as tmp:
        case = run_batch(args.model, args.snapshots, Path(tmp) / "out")
        positions = snapshot_positions(case)
        if len(positions) != args.snapshots:
            raise SystemExit(f"the batch wrote {len(positions)} snapshot(s), {args.snapshots} asked")
        for old in images.glob("tutorial_*.png"):
            old.unlink()
        written = []
        for i, (png, s_mm) in enumerate(positions, 1):
            target = IMAGES / f"tutorial_snapshot_{i}.png"
            shutil.copyfile(png, ROOT / target)
            written.append((target.as_posix(), s_mm))
        report_png = None
        if browser:
            target = IMAGES / "tutorial_report.png"
            screenshot(case / "report.html", ROOT / target, browser, Path(tmp) / "chromium-profile")
            report_png = target.as_posix()
        else:
            print("Chromium is not installed: the report picture was not made (apt-get install chromium)")
    readme = ROOT / "README.md"
    readme.write_text(replace_block(readme.read_text(), readme_block(args.model, written, report_png)))
    for name, s_mm in written:
        print(f"wrote {name} (S {s_mm:+.1f} mm)")
    if report_png:
        print(f"wrote {report_png}")
    print("updated README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
