"""The help formatter every command-line entry point of the project shares (torch-free)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Names each default once: `(default: X)` is added unless the help already names it; a
    required option says so instead."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is argparse.SUPPRESS or "default" in text:
            return text
        if action.required:
            return f"{text} (required)".strip()
        if action.option_strings and action.nargs != 0:
            default = "not set" if action.default is None else "%(default)s"
            return f"{text} (default: {default})".strip()
        return text
