"""python docs/make_cli.py [--check]

Writes docs/cli.md from the commands' own parsers (every flag, its default and help), the
exit codes and the environment variables in search/cli.py: the page and --help come from
one source. --check exits 1, writing nothing, when the page differs from what it would be.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "cli.md"


def _commands() -> list[argparse.ArgumentParser]:
    from search import evaluate, final, proxy, replay, run

    return [module.build_parser() for module in (run, final, evaluate, replay, proxy)]


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _flag(action: argparse.Action) -> str:
    names = ", ".join(action.option_strings) or action.metavar or action.dest
    takes_value = action.option_strings and action.nargs != 0
    return f"`{names} {action.metavar or action.dest.upper()}`" if takes_value else f"`{names}`"


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.default is None or isinstance(action.default, bool) or (
            action.default is argparse.SUPPRESS):
        return "-"
    return f"`{action.default}`"


def _summary(parser: argparse.ArgumentParser) -> str:
    """The description's first sentence, on one line."""
    text = " ".join((parser.description or "").split())
    return re.split(r"(?<!\.)\.\s", text, maxsplit=1)[0].rstrip(".") + "."


def _section(parser: argparse.ArgumentParser, usage: str) -> list[str]:
    lines = [f"## {parser.prog}", "", "```text", usage, "```", "",
             parser.description or "", ""]
    for group in parser._action_groups:  # argparse's groups, in --help's order
        actions = [a for a in group._group_actions if a.dest != "help"]
        if not actions:
            continue
        title = "options" if group.title in ("options", "optional arguments") else group.title
        lines += [f"**{title}**", "", "| flag | default | meaning |", "|---|---|---|"]
        for action in actions:
            meaning = (action.help or "") % {"default": action.default, "prog": parser.prog}
            lines.append(f"| {_flag(action)} | {_cell(_default(action))} | {_cell(meaning)} |")
        lines.append("")
    return lines


def render() -> str:
    from search.cli import ENVIRONMENT, EXIT_CODES

    width = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps the usage to the terminal's width
    try:
        parsers = _commands()
        usages = {p.prog: p.format_usage().strip() for p in parsers}
    finally:
        if width is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = width
    lines = [
        "# Command line", "",
        "<!-- written by `python docs/make_cli.py` from the parsers; tests hold it equal -->",
        "", "```bash", "python -m search.run --help     # the same text as here, for each command",
        "```", "",
        "Five commands, each with `--help` and `--version`:", "",
        *[f"- [`{p.prog}`](#{p.prog.replace(' ', '-').replace('.', '')}): {_summary(p)}"
          for p in parsers],
        "",
    ]
    for parser in parsers:
        lines += _section(parser, usages[parser.prog])
    lines += ["## Exit codes", "", "Every command:", "", "| code | meaning |", "|---|---|",
              *[f"| {code} | {_cell(meaning)} |" for code, meaning in EXIT_CODES], "",
              "## Environment variables", "", "| variable | what it sets |", "|---|---|",
              *[f"| `{name}` | {_cell(meaning)} |" for name, meaning in ENVIRONMENT], ""]
    return "\n".join(lines)


def main() -> int:
    sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    text = render()
    if args.check:
        same = PAGE.is_file() and PAGE.read_text(encoding="utf-8") == text
        print("docs/cli.md is current" if same else "docs/cli.md differs: run "
              "python docs/make_cli.py")
        return 0 if same else 1
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
