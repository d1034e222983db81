"""The documentation says what the code does: docs/cli.md is the parsers' own text, every
flag has help, every command answers --version, every command the pages show parses, the
scaling page's commands run as written, and no file speaks of how the product was made."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

import optuna
import pytest

import storage
from search import budget, evaluate, final, proxy, replay, run
from tests.test_proxy import _command, _free_port

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"search.run": run, "search.final": final, "search.evaluate": evaluate,
            "search.replay": replay, "search.proxy": proxy}
PAGES = sorted((ROOT / "docs").glob("*.md"))
PROSE = [ROOT / "README.md", *PAGES, *sorted((ROOT / "benchmarks").glob("*.md"))]


def _make_cli():
    spec = importlib.util.spec_from_file_location("make_cli", ROOT / "docs" / "make_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_page_is_what_the_parsers_say():
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert page == _make_cli().render(), "docs/cli.md is stale: run python docs/make_cli.py"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help_and_a_metavar(name):
    parser = COMMANDS[name].build_parser()
    assert parser.description and not parser.description.startswith("python -m")
    for action in parser._actions:
        assert action.help, f"{name} {action.option_strings or action.dest}: no help"
        if action.option_strings and action.nargs != 0:
            assert action.metavar, f"{name} {action.option_strings}: no metavar"


@pytest.mark.parametrize("name", COMMANDS)
def test_version_answers_on_every_command(name, capsys):
    with pytest.raises(SystemExit) as exited:
        COMMANDS[name].main(["--version"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("optuna-search ") and f"optuna {optuna.__version__}" in out


def test_the_readme_is_short_and_its_first_headings_find_each_task():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text) <= 12_000, f"README.md is {len(text):,} characters"
    headings = {line[3:].strip().lower() for line in text.splitlines()
                if line.startswith("## ")}
    # the contents, within the first screenful (40 lines), link each task's heading
    linked = {name.lower() for name, _ in re.findall(r"\[([^\]]+)\]\(#([^)]+)\)",
                                                     "\n".join(text.splitlines()[:40]))}
    for task in ("run", "dashboard", "best model", "gpu", "several machines"):
        assert any(task in name for name in linked & headings), (task, linked)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_each_page_opens_with_its_command(page):
    lines = [line for line in page.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith(("#", "<!--"))]
    assert lines[0] == "```bash", f"{page.name} opens with {lines[0]!r}"
    assert lines[1].startswith(("python", "optuna-dashboard")), lines[1]


@pytest.mark.parametrize("page", PROSE, ids=lambda p: p.name)
def test_links_between_pages_resolve(page):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def _shown_commands() -> list[tuple[str, str]]:
    """(page, line) of every concrete `python -m search.X ...` line in a code block."""
    shown = []
    for page in PROSE:
        inside = False
        for line in page.read_text(encoding="utf-8").splitlines():
            if line.startswith("```"):
                inside = not inside
            elif inside and line.startswith("python -m search."):
                command = line.split("  #")[0].strip()
                if not any(mark in command for mark in ("[", "|", "...")):
                    shown.append((page.name, command))
    return shown


def test_the_pages_show_commands():
    assert len(_shown_commands()) >= 10


@pytest.mark.parametrize("page,command", _shown_commands())
def test_every_command_the_pages_show_parses(page, command):
    words = shlex.split(command)
    parser = COMMANDS[words[2]].build_parser()
    try:
        parser.parse_args(words[3:])
    except SystemExit as exc:  # --help and --version exit 0
        assert exc.code == 0, f"{page}: {command!r} does not parse (exit {exc.code})"


# Words that describe the making of the product rather than the product: a tracker's item
# numbers and names for its tasks, a machine's loan, a work period named by its order. Each
# is written in two halves, so that this file, scanned too, does not match itself.
MADE_WORDS = [(r"\biss", r"ues? #?\d"), (r"\bwork[- ]it", r"ems?\b"), (r"\bwas le", r"nt\b"),
              (r"\b(?:this|previous|last|next|earlier|later|second|third|fourth|fifth) ses",
               "sion")]
MADE = re.compile("|".join(first + second for first, second in MADE_WORDS), re.IGNORECASE)


def test_no_file_speaks_of_how_the_product_was_made():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    files = [ROOT / name for name in listed if name.endswith((".py", ".md", ".sh", ".toml"))]
    assert len(files) > 50
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in files if path.is_file()
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if MADE.search(line)]
    assert not found, "\n".join(found)


def _tested_block(marker: str) -> list[str]:
    """The lines of the code block after `<!-- tested: marker -->` in docs/scaling.md."""
    text = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    block = text.split(f"<!-- tested: {marker} -->", 1)[1].split("```", 2)[1]
    return [line for line in block.splitlines()[1:] if line.strip()]


# What the tests below change in the page's commands, and only this: a study name of their
# own (the PostgreSQL database is shared), 6 trials instead of 200, the proxy's address on
# this machine, and flags that make a trial take a second (digits, 2 epochs, one worker).
SMALL = ["--data", "digits", "--epochs", "2", "--device", "cpu", "--workers", "1",
         "--final-seeds", "1"]


def _as_tested(command: str, study_name: str, **more: str) -> list[str]:
    command = command.replace("--study-name shared", f"--study-name {study_name}")
    command = command.replace("--max-trials 200", "--max-trials 6")
    for old, new in more.items():
        command = command.replace(old, new)
    return shlex.split(command)


def _machines(command: list[str], env_url: str, tmp_path: Path, n: int = 2):
    assert command[:3] == ["python", "-m", "search.run"], command
    args = [env_url if word == "$OPTUNA_STORAGE" else word for word in command[3:]]
    machines = [_command("search.run", [*args, *SMALL, "--runs-dir", str(tmp_path / f"m{i}")],
                         tmp_path) for i in range(n)]
    return [(m, *m.communicate(timeout=600)) for m in machines]


def _one_study_one_final(outputs, url: str, study_name: str, tmp_path: Path) -> None:
    """The machines shared one budget exactly, drew apart, left nothing running, and one of
    them ran the final step while the others said they left it."""
    for machine, _, err in outputs:
        assert machine.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name=study_name, storage=storage.open(url))
    assert budget.budget_used(study) == 6  # exactly, though each machine may add 20
    trials = study.get_trials()
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    counted = [tuple(sorted(t.params.items())) for t in trials
               if not t.user_attrs.get(budget.OVER_BUDGET)]
    assert len(set(counted)) == len(counted)  # no two machines drew the same trial
    assert sum("final model: test accuracy" in err for _, _, err in outputs) == 1
    assert sum("final step:" in err for _, _, err in outputs) == len(outputs) - 1
    assert len([p for p in tmp_path.glob(f"m*/{study_name}") if p.is_dir()]) == 1


def test_the_several_machines_commands_run_as_written(postgres_url, study_name, tmp_path):
    export, command = _tested_block("several machines")
    assert export.startswith('export OPTUNA_STORAGE="postgresql://')
    outputs = _machines(_as_tested(command, study_name, **{'"$OPTUNA_STORAGE"':
                                                           "$OPTUNA_STORAGE"}),
                        postgres_url, tmp_path, n=3)
    _one_study_one_final(outputs, postgres_url, study_name, tmp_path)


def test_the_proxy_commands_run_as_written(study_name, tmp_path):
    """Through a proxy in front of an SQLite file here (the same proxy serves PostgreSQL: its
    storage.open is the one the test above uses), so it runs where no server is."""
    serve, command = _tested_block("proxy")
    port = _free_port()
    served = _as_tested(serve, study_name, **{"--host 0.0.0.0": "--host 127.0.0.1",
                                              "--port 13000": f"--port {port}"})
    assert served[:3] == ["python", "-m", "search.proxy"], served
    database = f"sqlite:///{tmp_path / 'shared.db'}"
    args = [database if w == "$OPTUNA_STORAGE" else w for w in served[3:]]
    server = _command("search.proxy", args, tmp_path)
    try:
        url = f"grpc://127.0.0.1:{port}"
        outputs = _machines(_as_tested(command, study_name,
                                       **{"grpc://proxyhost:13000": url}), "", tmp_path)
        _one_study_one_final(outputs, url, study_name, tmp_path)
        # the final step's claim through the proxy: a study of its own, recorded in the study
        claims = [s.study_name for s in optuna.get_all_study_summaries(storage.open(url))
                  if s.study_name.startswith(f"{study_name}:final_claim:")]
        assert len(claims) == 1
    finally:
        server.terminate()
        server.communicate(timeout=60)
