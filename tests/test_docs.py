"""Every command and link of README.md and docs/*.md works from a fresh clone.

Each line of a fenced ``bash`` block is one command (``&&`` joins several; a trailing backslash continues a line):

- ``thinktwice fit|validate|test --config X ...`` parses: the CLI runs in-process with ``--print_config`` appended,
  as tests/test_cli.py parses the shipped configs (nothing is loaded or trained);
- ``thinktwice-cross-refine ...`` parses: its settings are built from the flags (``--print-settings``; no model or
  problem is loaded);
- ``python scripts/X.py ...`` answers ``--help``, every option it is given appears in that help, and what follows
  ``--`` (arguments for ``thinktwice fit``) parses as above;
- ``python -m pytest ...``: the README's test command is the one ``.ci/run`` runs;
- every ``configs/``, ``scripts/``, ``docs/``, ``tests/`` or ``.ci/`` path a command names exists.

A command of any other kind fails the test with its file and line, unless ``NOT_RUN`` names it with the reason it is
not run here (its paths are still checked). Besides: every ``yaml`` block parses and, merged over configs/tiny.yaml,
is accepted by the CLI; every relative markdown link (and image) points to an existing file, and a ``#anchor`` to
one of its headings.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pandas as pd
import pytest
import yaml

from thinktwice_pl.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEST_COMMAND = "bash scripts/install_cpu.sh && .venv/bin/python -m pytest"
QUICKSTART_COMMAND = "bash scripts/install_cpu.sh && .venv/bin/thinktwice fit --config configs/quickstart.yaml"

# Commands that are not run here, by how they start, with the reason. The paths they name are still checked.
NOT_RUN = {
    "bash scripts/install_cpu.sh": "installs packages from the network (CI runs it: .ci/run)",
    "bash scripts/gpu_check.sh": "needs a GPU machine; its --cpu mode runs in tests/test_gpu_check.py",
    "bash scripts/gpu_wheels.sh": "downloads wheels from a package registry",
    "bash scripts/gpu_smoke.sh": "needs a CUDA GPU with vLLM installed",
    "TRLBENCH=": "the TRL side-by-side runs from the team's bench-trl folder, outside this repository",
}
THINKTWICE = {"thinktwice", ".venv/bin/thinktwice"}
CROSS_REFINE = {"thinktwice-cross-refine", ".venv/bin/thinktwice-cross-refine"}
PYTHON = {"python", ".venv/bin/python"}
REPO_PATH = re.compile(r"^(configs|scripts|docs|tests|\.ci)/")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Command:
    where: str  # file:line, for messages and test ids
    tokens: tuple[str, ...]  # one command, continuation lines joined, comment removed

    @property
    def text(self) -> str:
        return " ".join(self.tokens)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _blocks(doc: Path, language: str) -> list[tuple[int, str]]:
    """(first line number, body) of every fenced block of `language` in `doc`."""
    text = doc.read_text()
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


def _commands(doc: Path) -> list[Command]:
    commands = []
    for first_line, body in _blocks(doc, "bash"):
        pending, start = "", 0
        for offset, line in enumerate(body.splitlines()):
            if not pending:
                start = first_line + offset
            pending += line
            if line.rstrip().endswith("\\"):
                pending = pending.rstrip()[:-1] + " "
                continue
            tokens = [*shlex.split(pending, comments=True), "&&"]  # comments dropped
            pending = ""
            while "&&" in tokens:
                cut = tokens.index("&&")
                if cut:
                    commands.append(Command(f"{_rel(doc)}:{start}", tuple(tokens[:cut])))
                tokens = tokens[cut + 1 :]
    return commands


COMMANDS = [c for doc in DOCS for c in _commands(doc)]


def _run_cli(args: tuple[str, ...]) -> tuple[int, str]:
    """Exit code and output of ``thinktwice <args> --print_config``, run in this process."""
    out = io.StringIO()
    code: int | str | None = "no exit"
    argv, sys.argv = sys.argv, ["thinktwice"]  # LightningCLI warns when pytest's own arguments are in sys.argv
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main([*args, "--print_config"])
        except SystemExit as exit_info:
            code = exit_info.code
        finally:
            sys.argv = argv
    return (0 if code is None else code), out.getvalue()  # type: ignore[return-value]


@cache
def _cli_parses(args: tuple[str, ...]) -> tuple[int, str]:
    # Repository paths made absolute, so the parse runs in a scratch folder whatever it would write.
    return _run_cli(tuple(str(ROOT / a) if REPO_PATH.match(a) else a for a in args))


@cache
def _script_help(script: str) -> tuple[int, str]:
    """Exit code and output of ``python <script> --help``, in this process (no second torch import)."""
    out, argv, path, environ = io.StringIO(), sys.argv, list(sys.path), dict(os.environ)
    code: int | str | None = "no exit"
    sys.argv = [script, "--help"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exit_info:
        code = exit_info.code
    finally:
        sys.argv, sys.path[:] = argv, path
        os.environ.clear()
        os.environ.update(environ)
    return (0 if code is None else code), out.getvalue()  # type: ignore[return-value]


def _check_paths(command: Command, tokens: list[str]) -> None:
    for token in tokens:
        path = token.split("=", 1)[1] if token.startswith("--") and "=" in token else token
        if REPO_PATH.match(path):
            assert (ROOT / path).exists(), f"{command.where}: `{command.text}` names {path}, which does not exist"


def _check_thinktwice(command: Command, args: list[str]) -> None:
    assert args and args[0] in ("fit", "validate", "test"), f"{command.where}: unknown subcommand in `{command.text}`"
    assert "--config" in args, f"{command.where}: `{command.text}` names no --config"
    code, out = _cli_parses(tuple(args))
    assert code == 0, f"{command.where}: `{command.text}` does not parse (exit {code}):\n{out[-2000:]}"


def _check_cross_refine(command: Command, args: list[str]) -> None:
    from thinktwice_pl.cross_refine import main as cross_refine

    out = io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            cross_refine([*args, "--print-settings"])
        except SystemExit as exit_info:
            code = exit_info.code
    assert code == 0, f"{command.where}: `{command.text}` does not parse (exit {code}):\n{out.getvalue()[-2000:]}"


def _check_script(command: Command, args: list[str]) -> None:
    script = args[0]
    assert script.startswith("scripts/") and script.endswith(".py"), f"{command.where}: unknown script {script}"
    cut = args.index("--") if "--" in args else len(args)
    own, passed_on = args[1:cut], args[cut + 1 :]
    code, help_text = _script_help(script)
    assert code == 0, f"{command.where}: `{script} --help` exits {code}:\n{help_text[-2000:]}"
    for option in (a.split("=", 1)[0] for a in own if a.startswith("--")):
        assert option in help_text, f"{command.where}: {script} has no option {option} (`{command.text}`)"
    if passed_on:  # arguments for `thinktwice fit`, after the script's config or the CPU comparison's
        config = own[own.index("--config") + 1] if "--config" in own else "configs/smollm2/thinktwice.yaml"
        _check_thinktwice(command, ["fit", "--config", config, *passed_on])


def _check_pytest(command: Command, args: list[str]) -> None:
    if command.text == ".venv/bin/python -m pytest":
        assert command.text in (ROOT / ".ci/run").read_text(), ".ci/run runs the README's test command"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.where} {c.text[:60]}")
def test_command_works_from_a_fresh_clone(command: Command, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tokens = list(command.tokens)
    _check_paths(command, tokens)
    if any(command.text.startswith(prefix) for prefix in NOT_RUN):
        return
    while tokens and ENV_ASSIGNMENT.match(tokens[0]):
        tokens = tokens[1:]
    if tokens[:2] == ["/usr/bin/time", "-v"]:
        tokens = tokens[2:]
    if tokens[0] in THINKTWICE:
        _check_thinktwice(command, tokens[1:])
    elif tokens[0] in CROSS_REFINE:
        _check_cross_refine(command, tokens[1:])
    elif tokens[0] in PYTHON and tokens[1:3] == ["-m", "pytest"]:
        _check_pytest(command, tokens[3:])
    elif tokens[0] in PYTHON and tokens[1].endswith(".py"):
        _check_script(command, tokens[1:])
    else:
        pytest.fail(f"{command.where}: no check for `{command.text}` (check it here, or list it in NOT_RUN with why)")


def test_readme_states_the_quickstart_and_test_commands() -> None:
    readme = [c.text for c in _commands(ROOT / "README.md")]
    joined = {" && ".join(readme[i : i + 2]) for i in range(len(readme) - 1)}
    assert QUICKSTART_COMMAND in joined, f"README.md runs the quickstart as `{QUICKSTART_COMMAND}`"
    assert TEST_COMMAND in joined, f"README.md runs the tests as `{TEST_COMMAND}`"
    assert ".venv/bin/python -m pytest" in (ROOT / ".ci/run").read_text(), ".ci/run runs the README's test command"


def test_readme_is_a_few_screens() -> None:
    assert len((ROOT / "README.md").read_bytes()) < 15_000, "README.md under 15 KB: reference material goes to docs/"


@pytest.mark.parametrize(
    ("doc", "first_line", "body"),
    [(doc, line, body) for doc in DOCS for line, body in _blocks(doc, "yaml")],
    ids=lambda v: _rel(v) if isinstance(v, Path) else str(v) if isinstance(v, int) else "",
)
def test_yaml_example_is_accepted_by_the_cli(
    doc: Path, first_line: int, body: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(yaml.safe_load(body), dict), f"{_rel(doc)}:{first_line}: a yaml example is a config mapping"
    example = tmp_path / "example.yaml"
    example.write_text(body)
    monkeypatch.chdir(tmp_path)
    code, out = _run_cli(("fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(example)))
    assert code == 0, f"{_rel(doc)}:{first_line}: the yaml example is not a valid config (exit {code}):\n{out[-2000:]}"


def _without_code(text: str) -> str:
    return FENCE.sub("", text)


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", _without_code(doc.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_relative_links_point_to_existing_files(doc: Path) -> None:
    broken = []
    for target in LINK.findall(_without_code(doc.read_text())):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {_rel(file)})")
    assert not broken, f"{_rel(doc)}: broken links: {broken}"


def test_readme_results_are_the_stored_summaries() -> None:
    """The README's results section shows each stored comparison's pooled table as `reproduce_cpu.py --publish`
    renders it from docs/results/<task>/summary.csv, and every score it quotes (x.xxx) is one of those summaries'."""
    from thinktwice_pl.comparison import pooled_table

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Results", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"<!-- table: (\S+) -->\n(.*?)<!-- /table -->", section, re.DOTALL)
    assert len(blocks) >= 2, "the README's results section shows the pooled table of each CPU task"
    quoted: set[str] = set()
    for folder, shown in blocks:
        assert shown == pooled_table(ROOT / folder), f"README's table of {folder} is not its summary.csv's"
        summary = pd.read_csv(ROOT / folder / "summary.csv")
        quoted |= {f"{v:.3f}" for column in ("value", "lo", "hi") for v in summary[column].dropna()}
        quoted |= {f"{-v:.3f}" for column in ("value", "lo", "hi") for v in summary[column].dropna()}
    numbers = set(re.findall(r"(?<![\d.])-?\d\.\d{3}(?!\d)", section))
    assert numbers <= quoted, f"the README quotes {sorted(numbers - quoted)}, which no stored summary holds"
