"""The documentation cannot drift from the code: the reference pages are a fresh generation,
every `edge-agent` command the README and the docs show parses with the real argument parser,
the `console` examples print what they show, and the README stays a five-minute read that
starts with the two commands. (`mkdocs build --strict` in .ci/run checks links and anchors.)"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gen_docs  # noqa: E402

README_MAX_BYTES = 8_500  # the "at most ~8 KB"
TWO_COMMANDS = [
    "./scripts/setup.sh && .venv/bin/edge-agent demo",
    "./scripts/setup.sh && .venv/bin/pytest",
]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
SHELL = ("bash", "sh", "shell", "console")
PROGRAMS = ("edge-agent", ".venv/bin/edge-agent")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _blocks(path: Path) -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in FENCE.findall(path.read_text()) if lang in SHELL]


def commands(lang: str, body: str) -> list[list[str]]:
    """The argv of every edge-agent command in a shell block: continuations joined, comments
    dropped, chains (&&, ;, |) split, `[--opt value]` (optional parts) kept without brackets,
    and `a|b|c` (alternatives) once per alternative. In a console block only `$ ` lines are
    commands."""
    text = body.replace("\\\n", " ")
    lines = text.splitlines()
    if lang == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    found = []
    for line in lines:
        tokens = shlex.split(line.replace("[", " ").replace("]", " "), comments=True)
        segment: list[str] = []
        for token in [*tokens, "&&"]:
            if token in ("&&", ";", "|", "||"):
                if segment and segment[0] in PROGRAMS:
                    found += _alternatives(segment[1:])
                segment = []
            else:
                segment.append(token)
    return found


def _alternatives(argv: list[str]) -> list[list[str]]:
    at = next((i for i, token in enumerate(argv) if "|" in token), None)
    if at is None:
        return [argv]
    return [
        variant
        for choice in argv[at].split("|")
        for variant in _alternatives([*argv[:at], choice, *argv[at + 1 :]])
    ]


def parse_problem(argv: list[str]) -> str | None:
    """None when `edge-agent ARGV` parses (options exist, choices and types hold), else
    what argparse said."""
    from edge_agent.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser(argv).parse_args(argv)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1]
    return None


def test_reference_pages_are_a_fresh_generation() -> None:
    stale = [
        name
        for name, text in gen_docs.generate().items()
        if not (gen_docs.OUT / name).is_file() or (gen_docs.OUT / name).read_text() != text
    ]
    assert not stale, f"docs/reference/{stale} differ from the code: run scripts/gen_docs.py"


def test_the_reference_names_every_key_option_and_metric() -> None:
    from edge_agent.cli import SUBCOMMANDS

    pages = gen_docs.generate()
    for key in ("`mqtt.port`", "`cameras[].mode`", "`recipes.<name>.inspections[].roi`"):
        assert key in pages["config.md"], key
    assert "`modbus.heartbeat_ms` | integer | `500` | >= 50, <= 60_000 |" in pages["config.md"]
    for name in SUBCOMMANDS:
        assert f"## `{name}`" in pages["cli.md"], name
    served = {row[0] for row in gen_docs.metric_rows()}
    assert {"edge_agent_ng_total", "edge_agent_queue_depth", "edge_agent_uptime_seconds"} <= served
    for name in served:
        assert f"| `{name}` |" in pages["metrics.md"]


def test_config_descriptions_come_from_the_example() -> None:
    docs = gen_docs.example_comments()
    assert docs["mqtt.keepalive_s"].startswith("Seconds between MQTT keepalive pings")
    assert docs["cameras[].id"].startswith("Letters, digits")  # a "- #" list-item comment
    assert "recipes.<name>.number" in docs  # the commented-out recipes example
    assert docs["cameras[].genicam.gain_db"].startswith("Gain in dB")  # under `genicam: null`
    assert not any("one of:" in text for text in docs.values())


def test_commands_are_found_as_a_reader_types_them() -> None:
    body = "edge-agent fit a \\\n  --out b  # note\nx && edge-agent bench [--json] | tail\n"
    assert commands("bash", body) == [["fit", "a", "--out", "b"], ["bench", "--json"]]
    assert commands("console", "$ edge-agent --version\nedge-agent 0.1.0\n") == [["--version"]]
    assert commands("sh", "edge-agent x [--choose a|b]") == [
        ["x", "--choose", "a"],
        ["x", "--choose", "b"],
    ]
    assert parse_problem(["fit", "d", "--out", "b", "--precision", "int4"]) is not None
    assert parse_problem(["evaluate", "--no-such-option"]) is not None


def test_every_edge_agent_command_shown_parses() -> None:
    shown = [
        (path.relative_to(ROOT), argv)
        for path in _pages()
        for lang, body in _blocks(path)
        for argv in commands(lang, body)
    ]
    assert len(shown) >= 25
    problems = [f"{where}: edge-agent {' '.join(argv)}: {why}" for where, argv in shown
                if (why := parse_problem(argv))]  # fmt: skip
    assert not problems, "\n".join(problems)


def _console_examples() -> list[tuple[str, str, list[str]]]:
    found = []
    for path in _pages():
        for lang, body in _blocks(path):
            if lang != "console":
                continue
            command, expected = None, []
            for line in [*body.splitlines(), "$ "]:
                if line.startswith("$ "):
                    if command:
                        found.append((str(path.relative_to(ROOT)), command, expected))
                    command, expected = line[2:], []
                else:
                    expected.append(line)
    return found


def matches(expected: list[str], got: list[str]) -> bool:
    """`...` on its own line stands for any lines (none included)."""
    pattern = "\n".join(
        ".*" if line == "..." else re.escape(line) for line in [*expected, ""]
    ).replace("\n.*\n", "(?:\n.*)*\n")
    return re.fullmatch(pattern, "\n".join([*got, ""]), re.S) is not None


@pytest.mark.parametrize("where,command,expected", _console_examples())
def test_console_examples_print_what_they_show(
    where: str, command: str, expected: list[str]
) -> None:
    argv = shlex.split(command)
    assert argv[0] in PROGRAMS, f"{where}: a console example runs edge-agent: {command}"
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent", *argv[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    got = (proc.stdout + proc.stderr).rstrip("\n").splitlines()
    assert matches(expected, got), f"{where}: $ {command}\nshown: {expected}\nprinted: {got}"


def test_console_examples_exist_and_the_matcher_is_strict() -> None:
    assert len(_console_examples()) >= 2
    assert matches(["a", "...", "c"], ["a", "b", "b2", "c"])
    assert matches(["a", "...", "c"], ["a", "c"])
    assert not matches(["a", "c"], ["a", "b", "c"])
    assert not matches(["a"], ["a", "extra"])


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= README_MAX_BYTES, f"README.md is {len(text.encode())} bytes"
    lang, first = FENCE.findall(text)[0]
    assert lang == "bash"
    lines = [line.split("#")[0].strip() for line in first.strip().splitlines()]
    assert lines == TWO_COMMANDS


def test_readme_links_name_files_that_exist() -> None:
    for name in ("README.md", "BENCHMARKS.md"):
        text = (ROOT / name).read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target:
                assert (ROOT / target).exists(), f"{name} links to missing {target}"


def test_docs_pages_cited_in_the_config_example_and_the_unit_exist() -> None:
    # tests/test_layout.py checks the .py and .sh files; these two are what users read first.
    for name in ("config.example.yaml", "systemd/edge-agent.service", "deploy/compose.yaml"):
        for page in re.findall(r"\bdocs/[\w./-]*\w", (ROOT / name).read_text()):
            assert (ROOT / page).exists(), f"{name} cites {page}, which does not exist"
