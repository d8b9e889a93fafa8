"""The layout is part of the product: packaging installs what the folders hold, under names
that cannot collide, and the README's map of the tree stays true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from edge_agent.cli import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"export": "edge_agent.export", "calibrate": "edge_agent.calibrate"}


def _package_dirs() -> dict[str, Path]:
    """Every folder that is a Python package, by the import name it must install as."""
    found = {}
    for init in sorted((ROOT / "edge_agent").rglob("__init__.py")):
        rel = init.parent.relative_to(ROOT)
        found[".".join(rel.parts)] = init.parent
    for folder, name in MAPPED.items():
        assert (ROOT / folder / "__init__.py").is_file()
        found[name] = ROOT / folder
    return found


def test_pyproject_installs_every_package_under_edge_agent() -> None:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(tool["packages"]) == sorted(_package_dirs())
    for folder, name in MAPPED.items():
        assert tool["package-dir"][name] == folder


def test_no_generic_top_level_packages_once_installed(tmp_path: Path) -> None:
    # From another folder, so the checkout itself is not on sys.path.
    code = (
        "import importlib.util as u;"
        "print(u.find_spec('export') is None, u.find_spec('calibrate') is None,"
        " u.find_spec('edge_agent.export') is not None,"
        " u.find_spec('edge_agent.calibrate') is not None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["True"] * 4


def _where_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Where things are\n(.*?)^#", text, re.S | re.M)
    assert match, "README.md has no 'Where things are' section"
    return match.group(1)


def test_readme_map_names_every_folder_and_only_real_paths() -> None:
    section = _where_section()
    named = set(re.findall(r"^\| `([^`]+)`", section, re.M))
    for path in named:
        assert (ROOT / path).exists(), f"README 'Where things are' names missing {path}"
    stages = {
        f"edge_agent/{p.name}/"
        for p in (ROOT / "edge_agent").iterdir()
        if (p / "__init__.py").is_file()
    }
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    top = {f"{p.split('/')[0]}/" for p in tracked if "/" in p and not p.startswith(".")}
    missing = (stages | top) - named
    assert not missing, f"README 'Where things are' does not say what is in {sorted(missing)}"


def test_run_time_packages_do_not_import_torch() -> None:
    code = (
        "import sys;"
        "import edge_agent.agent.service, edge_agent.calibrate.command, edge_agent.tools.bench,"
        " edge_agent.tools.evaluate;"
        "print(sorted(m for m in sys.modules"
        " if m.split('.')[0] in ('torch', 'torchvision', 'timm')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_prints_its_help(command: str) -> None:
    # argparse formats help texts with %: a stray one crashes --help (it did for fit).
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent", command, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "usage: edge-agent" in proc.stdout, proc.stderr[-2000:]


def _setup_extras() -> list[str]:
    """The extras scripts/setup.sh installs: the one list the README's sentence must repeat."""
    text = (ROOT / "scripts" / "setup.sh").read_text()
    found = re.findall(r"pip install -q -e '\.\[([a-z0-9,-]+)\]'", text)
    assert len(found) == 1, "setup.sh installs the package once, with its extras"
    return found[0].split(",")


def test_readme_names_the_extras_setup_installs() -> None:
    extras = _setup_extras()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(extras) <= set(declared["optional-dependencies"]), "setup.sh names no phantom"
    head = (ROOT / "README.md").read_text().split("\n## ", 1)[0]
    match = re.search(r"installs the package with its (.*?) extras", head, re.S)
    assert match, "README's opening says which extras setup.sh installs"
    named = re.findall(r"`([a-z0-9-]+)`", match.group(1))
    assert named == extras, f"README says {named}, setup.sh installs {extras}"


def test_docs_pages_cited_in_the_code_exist() -> None:
    """A docstring or message that sends a reader to docs/... must name a page that exists."""
    cited: dict[str, list[str]] = {}
    for folder in ("edge_agent", "export", "calibrate", "scripts", "tests"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".sh") or "sparkplug_b_pb2" in path.name:
                continue
            for page in re.findall(r"\bdocs/[\w./-]*\w", path.read_text(errors="replace")):
                cited.setdefault(page, []).append(str(path.relative_to(ROOT)))
    missing = {page: where for page, where in cited.items() if not (ROOT / page).exists()}
    assert not missing, f"cited docs pages that do not exist: {missing}"
