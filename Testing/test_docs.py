"""README.md and docs/ stay true: local links and images exist, every `headct-molre COMMAND` named in the README
is a real command, and the tutorial's picture block is exactly what scripts/make_tutorial_images.py writes for
the pictures in docs/images/ (so nobody hand-edits captions that no longer match the files)."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _tutorial_script():
    spec = importlib.util.spec_from_file_location("make_tutorial_images", ROOT / "scripts" / "make_tutorial_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_local_links_and_images_exist(page):
    missing = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # web links and anchors
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_every_command_the_readme_names_exists():
    from HeadCTMoLRELib import cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    named = set(re.findall(r"`headct-molre ([a-z][a-z-]+)", (ROOT / "README.md").read_text(encoding="utf-8")))
    assert named, "the README names no command"
    assert not named - set(commands), f"README names commands the CLI lacks: {sorted(named - set(commands))}"


def test_tutorial_block_is_the_scripts_output_for_the_pictures_present():
    script = _tutorial_script()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index(script.START):readme.index(script.END) + len(script.END)]
    snapshots = sorted((ROOT / "docs" / "images").glob("tutorial_snapshot_*.png"))
    assert snapshots, "no tutorial snapshots: run scripts/make_tutorial_images.py"
    positions = [float(s) for s in re.findall(r"\| snapshot \d+ \(S ([+-]\d+\.\d) mm\)", block)]
    assert len(positions) == len(snapshots)
    report = ROOT / script.IMAGES / "tutorial_report.png"
    expected = script.readme_block(Path("Resources/Models/demo"),
                                   [((script.IMAGES / p.name).as_posix(), s) for p, s in zip(snapshots, positions)],
                                   (script.IMAGES / report.name).as_posix() if report.exists() else None)
    assert block == expected
    assert re.search(r"\.venv/bin/headct-molre batch Resources/Samples/\S+ \\", block)


def test_tutorial_snapshot_names_parse_the_batch_file_names(tmp_path):
    script = _tutorial_script()
    for name in ("snapshot_02_S-0.9mm.png", "snapshot_01_S+63.1mm.png", "snapshot_10_S+5mm.png", "notes.png"):
        (tmp_path / name).write_bytes(b"")
    found = [(p.name, s) for p, s in script.snapshot_positions(tmp_path)]
    assert found == [("snapshot_01_S+63.1mm.png", 63.1), ("snapshot_02_S-0.9mm.png", -0.9),
                     ("snapshot_10_S+5mm.png", 5.0)]
