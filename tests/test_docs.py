"""The docs against the code, without training anything.

- Every ```bash block of README.md and docs/*.md is split as a shell would split it; each ``nnUNetv2_*`` command and
  each ``python benchmarks/...py`` script in it must name only flags its argparse parser has (our commands', nnU-Net's
  and the benchmark scripts' parsers, captured as their entry points build them), and then parse.
- ``docs/prediction.md`` lists every flag of ``nnUNetv2_arseg_predict`` and every variable of ``nnunet_arseg/env.py``
  once, with the default the parser / code has; every ``nnUNet_ARSEG_*`` the docs name exists in ``env.py``.
- Relative links resolve; the package version, ``CITATION.cff`` and the CHANGELOG's top entry agree.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import itertools
import re
import shlex
import sys
from importlib.metadata import entry_points
from pathlib import Path
from unittest import mock

import pytest

import nnunet_arseg
from nnunet_arseg import env

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FLAGS_PAGE = REPO / "docs" / "prediction.md"
PREDICT = "nnUNetv2_arseg_predict"
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", "do", "done", "then", "else", "fi", "{", "}"}
WRAPPERS = {"time", "nice", "env", "export", "sudo"}


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(parser.prog)
        self.parser = parser


def _capture_parser(run, argv0: str) -> argparse.ArgumentParser | None:
    """The parser ``run()`` builds, taken at its first parse (nothing after it runs); None if it parses nothing."""

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    saved = sys.argv
    sys.argv = [argv0]
    try:
        with mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture), \
                contextlib.redirect_stdout(io.StringIO()):
            run()
    except _Captured as captured:
        return captured.parser
    finally:
        sys.argv = saved
    return None


def _console_scripts() -> dict[str, str]:
    """``name -> module:function`` of nnU-Net's installed commands and of ours (from this checkout's pyproject)."""
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name.startswith("nnUNetv2_")}
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[)", (REPO / "pyproject.toml").read_text(), re.M | re.S)
    scripts.update(re.findall(r'^(\S+) = "([^"]+)"$', section.group(1), re.M))
    return scripts


_PARSERS: dict[str, argparse.ArgumentParser | None] = {}


def command_parser(command: str) -> argparse.ArgumentParser | None:
    """The parser of an ``nnUNetv2_*`` command or a ``benchmarks/*.py`` script (KeyError: no such command)."""
    if command not in _PARSERS:
        if command.endswith(".py"):
            path = REPO / command
            if not path.is_file():
                raise KeyError(command)
            sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import lidc_experiment as a sibling
            try:
                spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            finally:
                sys.path.remove(str(REPO / "benchmarks"))
            run = module.main
        else:
            module_name, function = _console_scripts()[command].split(":")
            run = getattr(importlib.import_module(module_name), function)
        _PARSERS[command] = _capture_parser(run, command)
    return _PARSERS[command]


def bash_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, text) of each ```bash block."""
    text = path.read_text()
    return [(text[:m.start(1)].count("\n") + 1, m.group(1)) for m in re.finditer(r"^```bash\n(.*?)^```", text,
                                                                               re.M | re.S)]


def logical_lines(block: str) -> list[str]:
    """The block's lines with continuations joined and here-document bodies left out."""
    lines, heredoc, current = [], None, ""
    for line in block.splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        match = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if match:
            heredoc = match.group(1)
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    return lines + ([current] if current else [])


def commands(block: str) -> list[list[str]]:
    """Every simple command of a block as tokens, leading variable assignments and wrappers (``time`` ...) kept
    (a ``for`` loop's header is a command too)."""
    out = []
    for line in logical_lines(block):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if token in SEPARATORS:
                out.append(current)
                current = []
            else:
                current.append(token)
        out.append(current)
    return [c for c in out if c]


def assignments(tokens: list[str]) -> tuple[dict[str, str], list[str]]:
    """(the variables a command assigns before its name, with their values; the command from its name on)."""
    assigned = {}
    while tokens and (tokens[0] in WRAPPERS or re.match(r"^\w+=", tokens[0])):
        if tokens[0] not in WRAPPERS:
            name, value = tokens[0].split("=", 1)
            assigned[name] = value
        tokens = tokens[1:]
    return assigned, tokens


def invocation(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(command, its arguments) for an ``nnUNetv2_*`` command or a ``python benchmarks/...py`` script, else None."""
    if tokens and tokens[0].startswith("nnUNetv2_"):
        return tokens[0], tokens[1:]
    if len(tokens) >= 2 and re.fullmatch(r"python3?", tokens[0]) and tokens[1].startswith("benchmarks/"):
        return tokens[1], tokens[2:]
    return None


def flags_of(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if re.match(r"^--?[A-Za-z]", a)]


def sample_folders(command: str, args: list[str], with_samples: dict[str, bool]) -> list[str]:
    """Records the folder a prediction writes; returns the folders an evaluation scores that were predicted without
    their samples (one ``-i`` folder is scored by its samples, several are a fold ensemble of consensus masks)."""
    if command == PREDICT and "-o" in args[:-1]:
        with_samples[args[args.index("-o") + 1]] = "--save_samples" in args
    if command == "nnUNetv2_arseg_evaluate" and "-i" in args[:-1]:
        folders = list(itertools.takewhile(lambda a: not a.startswith("-"), args[args.index("-i") + 1:]))
        return [f for f in folders if len(folders) == 1 and with_samples.get(f) is False]
    return []


def shell_values(args: list[str], variables: dict[str, str]) -> list[str]:
    """Arguments with shell variables replaced by the value the block gives them (a loop's first value, an
    assignment's value), other expansions by a value every option type accepts (1)."""
    def value(match: re.Match) -> str:
        return variables.get(match.group(1), "1")
    return [re.sub(r"\$\{?(\w+)\}?", value, a) if a != "$" else "1" for a in args]


def command_problems(path: Path) -> tuple[list[str], int]:
    """Problems of every command in ``path``'s bash blocks, and how many commands were checked."""
    problems, checked = [], 0
    for first_line, block in bash_blocks(path):
        with_samples: dict[str, bool] = {}  # prediction folders of the block: written with --save_samples?
        variables: dict[str, str] = {}
        for tokens in commands(block):
            if len(tokens) >= 4 and tokens[0] == "for" and tokens[2] == "in":
                variables[tokens[1]] = tokens[3]
                continue
            names, tokens = assignments(tokens)
            variables.update(names)
            where = f"{path.relative_to(REPO)} (block at line {first_line})"
            problems += [f"{where}: {name} is not a variable of nnunet_arseg/env.py"
                         for name in names if name.startswith("nnUNet_ARSEG_") and name not in env_variables()]
            found = invocation(tokens)
            if found is None:
                continue
            command, args = found
            problems += [f"{where}: {PREDICT} -o {folder} has no --save_samples, so {command} would score its "
                         f"consensus as identical samples" for folder in sample_folders(command, args, with_samples)]
            try:
                parser = command_parser(command)
            except KeyError:
                problems.append(f"{where}: no command or script {command}")
                continue
            checked += 1
            if parser is None:
                problems += [f"{where}: {command} takes no arguments, given {args}"] if args else []
                continue
            unknown = [f for f in flags_of(args) if f not in parser._option_string_actions]
            problems += [f"{where}: {command} has no flag {flag}" for flag in unknown]
            if not unknown:
                stderr = io.StringIO()
                with contextlib.redirect_stderr(stderr):
                    try:
                        parser.parse_args(shell_values(args, variables))
                    except SystemExit:
                        problems.append(f"{where}: {command} {' '.join(args)}: {stderr.getvalue().strip()}")
    return problems, checked


def env_variables() -> set[str]:
    return {value for name, value in vars(env).items()
            if name.isupper() and isinstance(value, str) and value.startswith("nnUNet_")}


def table_rows(path: Path, first_cell: str) -> dict[str, list[str]]:
    """The rows of ``path``'s tables whose first cell is a backticked name matching ``first_cell``: name -> cells
    (a name twice is an error)."""
    rows: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        match = re.match(rf"^\|\s*`({first_cell})[^`]*`\s*\|(.*)\|\s*$", line)
        if match:
            assert match.group(1) not in rows, f"{path.name} lists {match.group(1)} twice"
            rows[match.group(1)] = [c.strip() for c in match.group(2).split("|")]
    return rows


def normal(text: str) -> str:
    return " ".join(text.replace("`", "").replace("$", "").lower().split())


def formatted(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(formatted(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def help_default(action: argparse.Action) -> tuple[str, str] | None:
    """(variable, fallback) of a help text that says ``default $VARIABLE or FALLBACK``."""
    match = re.search(r"default:? \$(\w+) or ([^;()]+?)\s*(?:[;(]|$)", action.help or "")
    return (match.group(1), match.group(2)) if match else None


def flag_default_problems(flag: str, action: argparse.Action, cell: str) -> list[str]:
    """What the page's default cell of ``flag`` lacks of the parser's default."""
    expected = []
    if action.required:
        expected.append("required")
    elif isinstance(action, argparse._StoreTrueAction):
        expected.append("off")
    elif action.default is not None:
        expected.append(formatted(action.default))
    from_help = help_default(action)
    if from_help:
        expected += list(from_help)
    return [f"docs/prediction.md: {flag}'s default is '{cell}', the parser's says {e!r}"
            for e in expected if normal(e) not in normal(cell)]


def code_defaults() -> dict[str, str]:
    """The default of each variable of env.py as the code has it, where the page's flags do not say it already."""
    from nnunet_arseg.config import DEFAULT_NUM_SAMPLES
    from nnunet_arseg.training.base import MultiRaterTrainerBase

    with pytest.MonkeyPatch.context() as mp:
        for name in env_variables():
            mp.delenv(name, raising=False)
        with pytest.raises(RuntimeError):
            env.env_float(env.BUDGET_MINUTES, "a budget trainer")
        npp, nps = env.prediction_processes()
        defaults = {env.NUM_SAMPLES: formatted(env.num_samples(DEFAULT_NUM_SAMPLES)),
                    env.SEED: formatted(env.sampling_seed()),
                    env.TEMPERATURE: formatted(env.sampling_temperature()),
                    env.PRESENCE_TEMPERATURE: formatted(env.presence_temperature()),
                    env.MIRROR_HEAD: formatted(int(env.mirror_head())),
                    env.TRAINING_SEED: formatted(env.training_seed(MultiRaterTrainerBase.training_seed)),
                    env.BUDGET_MINUTES: "required",
                    env.SNAPSHOT_MINUTES: "off",
                    env.TOKENIZER: "unset" if env.tokenizer_file() is None else env.tokenizer_file(),
                    env.LOCK_TIMEOUT_MINUTES: formatted(env.lock_timeout_s() / 60),
                    env.HOSTNAME: "host name",
                    env.PREPROCESSING_PROCESSES: formatted(npp),
                    env.EXPORT_PROCESSES: formatted(nps)}
    return defaults


def docstring_default(variable: str) -> str | None:
    """The default env.py's docstring gives ``variable`` (``default X`` in its entry), for variables not above."""
    entry = re.search(rf"``{variable}``:(.*?)(?=\n- ``|\n\n)", env.__doc__, re.S)
    match = re.search(r"default:? (.+?)[.;]?$", entry.group(1).strip(), re.S) if entry else None
    return match.group(1).replace("``", "") if match else None


@pytest.fixture(scope="module")
def predict_parser():
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(env.PREPROCESSING_PROCESSES, raising=False)
        mp.delenv(env.EXPORT_PROCESSES, raising=False)
        _PARSERS.pop(PREDICT, None)
        parser = command_parser(PREDICT)
    _PARSERS.pop(PREDICT, None)  # the next use builds it under the caller's environment
    return parser


def test_every_command_in_the_docs_has_the_flags_it_uses():
    problems, checked = [], 0
    for path in DOCS:
        found, n = command_problems(path)
        problems += found
        checked += n
    assert checked >= 40, f"only {checked} commands found in the docs' bash blocks"
    assert not problems, "\n".join(problems)


def test_the_command_check_catches_wrong_flags_values_variables_and_an_evaluation_without_samples(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\nnnUNetv2_arseg_predict -i IN -o OUT -d 1 -c 2d --save_samples --num_sample 16\n"
                    "nnUNetv2_arseg_evaluate -i OUT -d 1 --num_samples\n"
                    "nnUNet_ARSEG_SEEDS=1 nnUNetv2_train 1 2d 0 -tr nnUNetTrainerARSeg \\\n    -no_such_flag\n"
                    "for T in 1 0.5; do nnUNetv2_arseg_predict -i IN -o O$T -d 1 -c 2d --temperature $T\n"
                    "  nnUNetv2_arseg_evaluate -i O$T -d 1; done\n"
                    "for D in cpu; do nnUNetv2_arseg_train_tokenizer 1 2d -device $D; done  # a loop's value parses\n"
                    "```\n")
    with mock.patch(f"{__name__}.REPO", tmp_path):
        problems, checked = command_problems(page)
    assert checked == 6
    assert len(problems) == 5, problems
    assert "nnUNetv2_arseg_predict has no flag --num_sample" in problems[0]
    assert "--num_samples: expected one argument" in problems[1]
    assert "nnUNet_ARSEG_SEEDS is not a variable" in problems[2]
    assert "nnUNetv2_train has no flag -no_such_flag" in problems[3]
    assert "-o O$T has no --save_samples" in problems[4]


def test_the_flags_page_lists_every_flag_of_the_predict_command_with_its_default(predict_parser):
    rows = table_rows(FLAGS_PAGE, r"--?[A-Za-z_]+")
    actions = {flag: action for action in predict_parser._actions for flag in action.option_strings
               if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)}
    problems = [f"docs/prediction.md does not list {flag} of {PREDICT}" for flag in actions if flag not in rows]
    problems += [f"docs/prediction.md lists {flag}, which {PREDICT} does not have" for flag in rows
                 if flag not in actions]
    for flag, cells in rows.items():
        if flag in actions:
            problems += flag_default_problems(flag, actions[flag], cells[0])
    assert len(actions) >= 30 and len(rows) >= 30
    assert not problems, "\n".join(problems)


def test_the_flags_page_lists_every_variable_of_env_py_with_its_default(predict_parser):
    rows = table_rows(FLAGS_PAGE, r"nnUNet_\w+")
    from_help = dict(filter(None, (help_default(a) for a in predict_parser._actions)))
    defaults = {**code_defaults(), **from_help}
    problems = [f"docs/prediction.md does not list {v} (nnunet_arseg/env.py)" for v in env_variables() if v not in rows]
    problems += [f"docs/prediction.md lists {v}, which nnunet_arseg/env.py does not have" for v in rows
                 if v not in env_variables()]
    for variable, cells in rows.items():
        if variable not in env_variables():
            continue
        expected = defaults.get(variable) or docstring_default(variable)
        assert expected is not None, f"no default known for {variable}: say it in env.py's docstring ('default X')"
        if normal(expected) not in normal(cells[0]):
            problems.append(f"docs/prediction.md: {variable}'s default is '{cells[0]}', the code's is {expected!r}")
    assert len(env_variables()) >= 14
    assert not problems, "\n".join(problems)


def test_every_variable_the_docs_name_is_read_by_env_py():
    problems = [f"{path.relative_to(REPO)}: {name} is not in nnunet_arseg/env.py"
                for path in DOCS for name in sorted(set(re.findall(r"nnUNet_ARSEG_\w+", path.read_text())))
                if name not in env_variables()]
    assert not problems, "\n".join(problems)


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", path.read_text(), re.M)}


def test_every_relative_link_of_the_docs_resolves():
    problems = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.exists():
                problems.append(f"{path.relative_to(REPO)}: {target} does not exist")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                problems.append(f"{path.relative_to(REPO)}: {target}: no heading #{anchor}")
    assert not problems, "\n".join(problems)


def test_the_version_the_citation_and_the_changelog_agree():
    version = nnunet_arseg.__version__
    citation = re.search(r"^version: (\S+)$", (REPO / "CITATION.cff").read_text(), re.M).group(1)
    top = re.search(r"^## (\S+)", (REPO / "CHANGELOG.md").read_text(), re.M).group(1)
    assert citation == version and top == version, (version, citation, top)
    stale = [f"{p.relative_to(REPO)}: {m}" for p in DOCS for m in re.findall(r"\b\d+\.\d+-dev\b", p.read_text())]
    assert not stale, f"development versions named in the docs: {stale}"


def test_the_readme_stays_one_screen_and_the_results_a_model_card():
    assert len((REPO / "README.md").read_text().splitlines()) <= 120
    assert len((REPO / "docs" / "results.md").read_text().splitlines()) <= 150

