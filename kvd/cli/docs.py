"""docs/cli.md from the command-line parsers: `make docs` (``python -m kvd.cli.docs``) writes
it, ``--check`` says whether the committed text still matches the parsers.

Every synopsis in the docs is generated here from `kvd`'s and `kvctl`'s argparse parsers, so a
flag added to a parser is documented by rerunning `make docs`. The text depends on the
parsers alone — not on the terminal's width or on the Python version's help layout: each
command is a usage line wrapped at a fixed width and a table of its options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BEGIN = "<!-- BEGIN GENERATED: make docs writes what follows from the parsers; do not edit by hand -->"
END = "<!-- END GENERATED -->"
DEFAULT_FILE = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
WIDTH = 96


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def _shown(action: argparse.Action) -> bool:
    return (
        action.help is not argparse.SUPPRESS
        and not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
    )


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest if not action.option_strings else action.dest.upper()


def _argument(action: argparse.Action) -> str:
    """What follows the flag (or stands alone, for a positional), with its repetition."""
    if action.nargs == 0:
        return ""
    m = _metavar(action)
    return {"?": f"[{m}]", "*": f"[{m} ...]", "+": f"{m} [{m} ...]"}.get(action.nargs, m)


def _usage_item(action: argparse.Action) -> str:
    if not action.option_strings:
        return _argument(action)
    flag = max(action.option_strings, key=len)
    text = f"{flag} {_argument(action)}".rstrip()
    return text if action.required else f"[{text}]"


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:
        text = text % {**vars(action), "prog": prog}
    return " ".join(text.split()).replace("|", "\\|")


def _wrap(words: list[str], indent: int) -> str:
    lines, line = [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > WIDTH:
            lines.append(line)
            line = " " * indent + word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])


def _section(path: list[str], help_text: str, parser: argparse.ArgumentParser, inherited: set[str]) -> list[str]:
    """One command: its heading, what it does, its usage line and its options' table."""
    prog = " ".join(path)
    actions = [a for a in parser._actions if _shown(a) and not set(a.option_strings) & inherited]
    grouped = {id(a): g for g in parser._mutually_exclusive_groups for a in g._group_actions}
    items, seen = [], set()
    for a in actions:
        group = grouped.get(id(a))
        if group is None:
            items.append(_usage_item(a))
        elif id(group) not in seen:
            seen.add(id(group))
            members = [a2 for a2 in group._group_actions if _shown(a2)]
            inner = " | ".join(_usage_item(m).strip("[]") for m in members)
            items.append(f"({inner})" if group.required else f"[{inner}]")
    subs = _subcommands(parser)
    if subs:
        items.append("{" + ",".join(name for name, _, _ in subs) + "} ...")
    out = [f"## `{prog}`", ""]
    for text in (help_text, parser.description):
        if text:
            out += [" ".join(text.split()), ""]
    out += ["```text", _wrap([prog, *items], len(prog) + 1), "```", ""]
    if inherited and any(set(a.option_strings) & inherited for a in parser._actions):
        out += [f"It also takes the options of `{' '.join(path[:-1])}`.", ""]
    if actions:
        out += ["| option | value | meaning |", "|---|---|---|"]
        for a in actions:
            names = ", ".join(f"`{s}`" for s in a.option_strings) or f"`{_metavar(a)}`"
            arg = f"`{_argument(a)}`" if a.option_strings and _argument(a) else ""
            out.append(f"| {names} | {arg} | {_help(a, prog)} |")
        out.append("")
    if subs:
        out += ["| command | does |", "|---|---|"]
        out += [f"| `{prog} {name}` | {' '.join(text.split())} |" for name, text, _ in subs]
        out.append("")
    return out


def _walk(path: list[str], help_text: str, parser: argparse.ArgumentParser, inherited: set[str]) -> list[str]:
    out = _section(path, help_text, parser, inherited)
    # kvctl's common options repeat on every subcommand: they are documented once, at kvctl.
    own = {s for a in parser._actions if _shown(a) for s in a.option_strings}
    for name, text, sub in _subcommands(parser):
        out += _walk([*path, name], text, sub, own | inherited if path[0] == "kvctl" else set())
    return out


def generate() -> str:
    """The generated part of docs/cli.md, markers included."""
    from kvd.cli.kvctl import build_parser as kvctl_parser
    from kvd.cli.kvd_main import build_parser as kvd_parser

    lines = [BEGIN, ""]
    for prog, parser in (("kvd", kvd_parser()), ("kvctl", kvctl_parser())):
        lines += _walk([prog], "", parser, set())
    lines.append(END)
    return "\n".join(lines) + "\n"


def splice(text: str, generated: str, where: Path) -> str:
    """``text`` with its generated part replaced; ValueError naming ``where`` without markers."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{where}: no generated part (a line {BEGIN!r}, then {END!r})")
    rest = text[end + len(END) :]
    return text[:start] + generated + (rest[1:] if rest.startswith("\n") else rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvd.cli.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE, help="the file to write (default docs/cli.md)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file differs")
    args = parser.parse_args(argv)
    try:
        text = args.file.read_text()
        new = splice(text, generate(), args.file)
    except (OSError, ValueError) as exc:
        print(f"kvd.cli.docs: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"kvd.cli.docs: {args.file} differs from the parsers; run `make docs`", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.file.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
