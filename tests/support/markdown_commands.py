"""The commands of a Markdown file's shell code blocks, and the options of an argparse help text.

Used by tests/integration/test_readme.py to run what the README tells people to type.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

SHELL_LANGUAGES = frozenset({"bash", "sh", "shell", "console", "zsh"})
_FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_PYTHON = re.compile(r"(.*/)?python(3(\.\d+)?)?")


@dataclass(frozen=True)
class Command:
    """One command of a shell code block: where it starts and what it says."""

    line: int  # 1-based line of the Markdown file where the command starts
    text: str  # as written: continuation lines joined, the trailing comment dropped

    @property
    def key(self) -> str:
        """The command for matching: leading VAR=value words dropped, any python spelled `python`."""
        words = shlex.split(self.text)
        while words and _ASSIGNMENT.match(words[0]):
            words.pop(0)
        if words and _PYTHON.fullmatch(words[0]):
            words[0] = "python"
        return " ".join(words)

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text}"


@dataclass(frozen=True)
class CodeBlock:
    line: int  # the line of the first line of code, after the opening fence
    language: str
    code: str


def code_blocks(markdown: str) -> list[CodeBlock]:
    """Every fenced code block, with its language ('' when the fence names none)."""
    blocks: list[CodeBlock] = []
    fence = ""
    language = ""
    start = 0
    body: list[str] = []
    for number, line in enumerate(markdown.splitlines(), start=1):
        match = _FENCE.match(line)
        if not fence:
            if match:
                fence, language, start, body = (
                    match.group(1),
                    match.group(2).lower(),
                    number + 1,
                    [],
                )
        elif match and match.group(1).startswith(fence[:3]) and not match.group(2):
            blocks.append(CodeBlock(start, language, "\n".join(body)))
            fence = ""
        else:
            body.append(line)
    return blocks


def _split_unquoted(text: str) -> list[str]:
    """Split at `&&`, `||` and `;` outside quotes, and drop a `#` comment outside quotes."""
    parts: list[str] = []
    current: list[str] = []
    quote = ""
    i = 0
    while i < len(text):
        char = text[i]
        if quote:
            current.append(char)
            if char == quote:
                quote = ""
            elif char == "\\" and quote == '"' and i + 1 < len(text):
                current.append(text[i + 1])
                i += 1
        elif char in "'\"":
            quote = char
            current.append(char)
        elif char == "#" and (not current or current[-1].isspace()):
            break
        elif text.startswith(("&&", "||"), i) or char == ";":
            parts.append("".join(current))
            current = []
            i += 1 if char == ";" else 2
            continue
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def shell_commands(markdown: str) -> list[Command]:
    """The commands of every shell code block (bash, sh, shell, console, zsh), in order.

    Backslash-continued lines are joined; `a && b` and `a; b` are two commands; in a `console`
    block only lines after a `$ ` prompt are commands (the rest is output).
    """
    commands: list[Command] = []
    for block in code_blocks(markdown):
        if block.language not in SHELL_LANGUAGES:
            continue
        pending = ""
        pending_line = 0
        for offset, raw in enumerate(block.code.splitlines()):
            line = raw.rstrip()
            if not pending:
                pending_line = block.line + offset
                if block.language == "console":
                    if not line.lstrip().startswith("$ "):
                        continue
                    line = line.lstrip()[2:]
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            text = pending + line
            pending = ""
            for part in _split_unquoted(text):
                commands.append(Command(pending_line, " ".join(part.split())))
    return commands


@dataclass(frozen=True)
class HelpOption:
    """One option of an argparse help text."""

    flags: tuple[str, ...]  # e.g. ("--top-k",) or ("--uvloop", "--no-uvloop")
    takes_value: bool
    required: bool
    help: str  # the option's help, its lines joined


_OPTION_LINE = re.compile(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$")
_HELP_LINE = re.compile(r"^\s{3,}(\S.*)$")


def help_options(text: str) -> list[HelpOption]:
    """The options an argparse `--help` output lists (in any section), with their help text."""
    usage = " ".join(text.split("\n\n", 1)[0].split())
    options: list[HelpOption] = []
    invocation = ""
    help_lines: list[str] = []

    def finish() -> None:
        if not invocation:
            return
        words = invocation.replace(",", " ").split()
        flags = tuple(word for word in words if word.startswith("-"))
        takes_value = any(not word.startswith("-") for word in words)
        required = any(
            re.search(rf"(^|\s){re.escape(flag)}(\s|$)", usage)
            and not re.search(rf"[\[|]\s?{re.escape(flag)}[\s\]]", usage)
            for flag in flags
        )
        options.append(HelpOption(flags, takes_value, required, " ".join(filter(None, help_lines))))

    for line in text.splitlines():
        option = _OPTION_LINE.match(line)
        if option:
            finish()
            invocation, help_lines = option.group(1), [option.group(2) or ""]
        elif invocation and _HELP_LINE.match(line):
            help_lines.append(line.strip())
        else:
            finish()
            invocation, help_lines = "", []
    finish()
    return options


def subcommands(text: str) -> list[str]:
    """The subcommands an argparse help text lists under its positional arguments."""
    section = re.search(r"^positional arguments:\n((?:[ \t]+.*\n?)*)", text, re.MULTILINE)
    if not section:
        return []
    return re.findall(r"^    (\w[\w-]*)", section.group(1), re.MULTILINE)
