"""mkdocs hook: the command reference (reference/cli.md), generated from `search._parser`.

Every command gets its summary, a table of its arguments and its `--help` text exactly as
`tlsearch COMMAND --help` prints it at 100 columns, so the page cannot drift from the parser
(tests/test_docs.py compares the two for every command).
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from typing import Iterator

PAGE = "reference/cli.md"
COLUMNS = "100"  # the width the page's --help texts are formatted at (and the test runs them at)


@contextmanager
def _columns() -> Iterator[None]:
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = COLUMNS
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every `tlsearch` command's parser, by name, in the parser's order."""
    from search._parser import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def summaries() -> dict[str, str]:
    """Each command's one-line help, as `tlsearch --help` lists it."""
    from search._parser import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a.help or "" for a in sub._choices_actions}


def help_text(name: str) -> str:
    """`tlsearch NAME --help` as the command prints it at COLUMNS columns."""
    with _columns():
        return commands()[name].format_help()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def _argument_rows(p: argparse.ArgumentParser) -> list[str]:
    rows = []
    for a in p._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        name = ", ".join(f"`{s}`" for s in a.option_strings) or f"`{a.metavar or a.dest}`"
        if a.option_strings and a.nargs != 0:
            name += f" `{a.metavar or a.dest.upper()}`"
        if a.required or not a.option_strings:
            default = "required"
        elif a.nargs == 0:
            default = "off"
        elif a.default in (None, argparse.SUPPRESS):
            default = "—"
        else:
            default = f"`{a.default}`"
        choices = f" (one of {', '.join(map(str, a.choices))})" if a.choices else ""
        rows.append(f"| {name} | {default} | {_cell((a.help or '') + choices)} |")
    return rows


def page() -> str:
    """The whole reference page as markdown."""
    lines = ["# Commands", "",
             "Generated from the parser (`search/_parser.py`) when the site is built: every command, its",
             "arguments, and its `--help` text exactly as the command prints it. `tlsearch --help` lists",
             "them; `python -m search` is the same command.", "",
             "| command | does |", "|---|---|"]
    helps = summaries()
    for name in commands():
        lines.append(f"| [`{name}`](#{name}) | {_cell(helps.get(name, ''))} |")
    for name, p in commands().items():
        summary = helps.get(name, "")
        lines += ["", f"## {name}", "", summary[:1].upper() + summary[1:] + ".", "",
                  "| argument | default | meaning |", "|---|---|---|", *_argument_rows(p), "",
                  '```text title="tlsearch ' + name + ' --help"', help_text(name).rstrip("\n"), "```"]
    return "\n".join(lines) + "\n"


def on_files(files, config):  # noqa: ANN001, ANN201 - mkdocs hook signature
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=page()))
    return files
