"""The README and docs/ as a user reads them: every `ami` command in them parses and its configuration resolves
(the YAML files they show are written where the commands run), the short ones (`ami config`, `ami --version`)
run as written, and the README's Python example runs as written."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ami.bench import control
from ami.cli import parse
from ami.config import load_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)


def commands(page: Path) -> list[str]:
    """The `ami ...` lines of a page's bash blocks (`torchrun ... -m ami.cli ...` ones as `ami ...`), continuation
    lines joined, comments dropped."""
    found = []
    for block in blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s+#\s", line)[0].strip()
            line = re.sub(r"^torchrun .*?-m ami\.cli ", "ami ", line)
            found += [part.strip() for part in line.split("&&") if part.strip().startswith("ami ")]
    return found


ALL = [(page.name, command) for page in PAGES for command in commands(page)]


def test_the_docs_hold_commands_and_link_pages_that_exist():
    assert len(ALL) >= 20, ALL
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+\.(?:md|png))", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.name} links {target}, which does not exist"


@pytest.fixture
def doc_files(tmp_path, monkeypatch):
    """A folder holding every YAML file the docs show (a block whose first line is `# name.yaml`)."""
    for page in PAGES:
        for block in blocks(page, "yaml"):
            name = re.match(r"# (\S+\.yaml)", block)
            if name:
                (tmp_path / name.group(1)).write_text(block)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("page", "command"), ALL, ids=[f"{p}: {c[:60]}" for p, c in ALL])
def test_every_command_parses_and_its_config_resolves(page, command, doc_files):
    argv = [re.sub(r"<[^>]*>", "RUN", word) for word in shlex.split(command)[1:]]
    args = parse(argv)  # argparse exits 2 on a flag or subcommand that does not exist
    name = args.bench if args.command == "bench" else args.command
    if (name == "train" and not args.resume) or name in ("config", "planner"):
        load_config(args.overrides)
    elif name in ("control", "safety"):
        load_config([f"env={args.env}", *args.overrides])
        if name == "control" and args.vs not in control.PEERS:
            load_config([f"env={args.env}", *args.overrides, *args.vs.split(",")])


SHORT = [(page, command) for page, command in ALL if command.startswith(("ami config", "ami --version"))]


@pytest.mark.parametrize(("page", "command"), SHORT, ids=[c for _, c in SHORT])
def test_short_commands_run_as_written(page, command, doc_files):
    result = subprocess.run([sys.executable, "-m", "ami.cli", *shlex.split(command)[1:]], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, (command, result.stderr)
    assert result.stdout.strip()


def test_the_readme_python_example_runs_as_written(tmp_path):
    (example,) = [block for block in blocks(ROOT / "README.md", "python")]
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) < 0  # Pendulum's mean evaluation return
    assert (tmp_path / "pendulum.pt").is_file() and list((tmp_path / "runs").iterdir())
