"""The CLI reference (docs/reference/cli.md), generated from `dgm_scale.cli.build_parser()`.

Every command and subcommand with its description (the `help=` it was added with), its usage
line, and every argument and option with its help and default, read from the same parser that
`dgm-scale` runs, so the page cannot drift from the command line.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

from dgm_scale.cli import build_parser

from ref_markdown import code, table, text

USAGE_WIDTH = 100  # a fixed width: the page must not depend on the terminal that built it


@dataclass(frozen=True)
class Command:
    """One parser of the tree: `path` as typed (`dgm-scale checkpoint to-plain`), `about` its description."""

    path: str
    about: str
    parser: argparse.ArgumentParser

    def arguments(self) -> List[argparse.Action]:
        """Its arguments and options, without -h / --help and the subcommand choice."""
        return [action for action in self.parser._actions
                if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))]

    def subcommands(self) -> List[str]:
        return [name for action in self.parser._actions if isinstance(action, argparse._SubParsersAction)
                for name in action.choices]


def commands(parser: Optional[argparse.ArgumentParser] = None, path: str = "dgm-scale") -> Iterator[Command]:
    """The parser and every (nested) subcommand parser, depth first, in the order they were added
    (a subcommand's description is its `help=`: dgm_scale.cli._describe_subcommands)."""
    parser = parser or build_parser()
    yield Command(path, parser.description or "", parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, f"{path} {name}")


def usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=USAGE_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def invocation(action: argparse.Action) -> str:
    """How it is typed: `--num NUM, --num-samples NUM`, `--format {png,npz}`, `checkpoint`."""
    return argparse.HelpFormatter("dgm-scale")._format_action_invocation(action)


def help_of(action: argparse.Action) -> str:
    """Its help with argparse's %(default)s-style fields filled in, as `-h` shows it."""
    if not action.help:
        return ""
    return argparse.HelpFormatter("dgm-scale")._expand_help(action)


def default_of(action: argparse.Action) -> str:
    """The Default column: `required`, the value, or "" where there is none to show."""
    if action.required and action.option_strings:
        return "required"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return code(str(action.default).lower())
    if action.default in (None, argparse.SUPPRESS) or action.default == [] or not action.option_strings:
        return ""
    return code(str(action.default) if not isinstance(action.default, str) or action.default else '""')


def _rows(command: Command) -> List[Tuple[str, ...]]:
    return [(code(invocation(action)), default_of(action), text(help_of(action))) for action in command.arguments()]


def _anchor(path: str) -> str:
    return path.replace(" ", "-")


def _command_section(command: Command, depth: int) -> List[str]:
    # the heading's id (toc's slug of its text) is _anchor(path): the links above point at it
    lines = [f"{'#' * min(depth, 6)} `{command.path}`", "", text(command.about), "",
             "```text", usage(command.parser), "```", ""]
    if command.arguments():
        lines += [*table(("Argument", "Default", "Description"), _rows(command)), ""]
    subs = command.subcommands()
    if subs:
        links = [f"[`{name}`](#{_anchor(command.path + ' ' + name)})" for name in subs]
        lines += ["Subcommands: " + ", ".join(links), ""]
    return lines


def cli_reference() -> str:
    """The page's markdown."""
    all_commands = list(commands())
    root = all_commands[0]
    lines = ["# CLI reference", "",
             "Generated from the argument parsers (`dgm_scale.cli.build_parser()`) at every docs build. "
             "Every command also takes `-h` / `--help`, which prints the same help on the terminal.", "",
             *table(("Command", "What it does"), [(f"[`{c.path}`](#{_anchor(c.path)})", text(c.about))
                                                  for c in all_commands[1:]]), ""]
    lines += _command_section(root, 2)
    for command in all_commands[1:]:
        lines += _command_section(command, 1 + command.path.count(" "))
    return "\n".join(lines)


def described(command: Command) -> List[Tuple[str, Any]]:
    """What the reference would show without a description: (command path, argument or None)."""
    missing = [(command.path, None)] if not command.about.strip() else []
    return missing + [(command.path, invocation(action)) for action in command.arguments()
                      if not help_of(action).strip()]
