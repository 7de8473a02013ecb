"""The MONAI model zoo's format rules hold (its code-format job): black and isort at 120 columns, flake8 with the
zoo's plugins and exclusions (pyproject.toml, setup.cfg), and JSON files pretty-printed with 4 spaces and keys
in their written order. Each tool is run as the zoo runs it; a failure prints the tool's own findings."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = ["scripts", "tests", "benchmarks", "apps"]


def _json_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "*.json"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [f for f in listed.stdout.split() if not f.startswith(("demo/", "data/", "bundle/"))]


@pytest.mark.parametrize(
    "tool",
    [
        ["black", "--check", "--quiet", *CODE],
        ["isort", "--check-only", "--quiet", "--settings-path", "setup.cfg", *CODE],
        ["flake8", "--count", *CODE],
        ["pre_commit_hooks.pretty_format_json", "--no-sort-keys", "--indent=4", "JSON"],
    ],
    ids=["black", "isort", "flake8", "pretty-format-json"],
)
def test_the_zoo_format_rules_hold(tool):
    args = [a for a in tool[1:] if a != "JSON"] + (_json_files() if "JSON" in tool else [])
    done = subprocess.run([sys.executable, "-m", tool[0], *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"{tool[0]} found:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
