"""`--help` shows every option's default: `show_defaults(parser)` appends "(default: X)" to each option whose
default means something (not None, False or suppressed) and whose help does not already say it; subcommands too.
Used by every program's parser, so the defaults a user sees are the ones argparse applies."""

from __future__ import annotations

import argparse


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)
            continue
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS or default == []:
            continue
        if isinstance(action, argparse._StoreFalseAction):
            continue  # default True of a --no-... switch: "off" is implied
        text = action.help or ""
        if "default" in text.lower():
            continue
        action.help = f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
    return parser
