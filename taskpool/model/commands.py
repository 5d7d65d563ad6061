"""A job of real work's text, read the same way by the job file's parser (to refuse a bad
line before anything runs) and by the worker that runs it (core/commands.py):

    sh TEXT      TEXT as it is, for /bin/sh -c
    exec TEXT    TEXT split as a POSIX shell splits words (shlex, `#` starts a comment)
    call M:F ARGS...   M a module path, F a function (or a dotted attribute path) in it,
                 ARGS JSON values separated by blanks (`#` after a blank starts a comment)

Every function raises CommandError, whose text is the reason a job file's line reports.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

# `package.module:function`, or `module:Class.method`: Python identifiers, ASCII.
_TARGET = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", re.ASCII)
_JSON = json.JSONDecoder()
_BLANK = re.compile(r"\s*")


class CommandError(ValueError):
    """Why a command's text cannot run; its text is for people."""


def shell_text(text: str) -> str:
    """An sh job's command: refused if empty, or if its quotes do not balance as shlex
    reads them (a POSIX shell would wait for the closing quote on the next line)."""
    if not text.strip():
        raise CommandError("sh: empty command (expected 'sh COMMAND')")
    try:
        shlex.split(text, comments=True)
    except ValueError as e:
        raise CommandError(f"sh: {_quote_problem(e)}") from None
    return text


def exec_argv(text: str) -> list[str]:
    """An exec job's program and arguments, as a POSIX shell splits the words."""
    try:
        argv = shlex.split(text, comments=True)
    except ValueError as e:
        raise CommandError(f"exec: {_quote_problem(e)}") from None
    if not argv:
        raise CommandError("exec: empty command (expected 'exec PROGRAM [ARGS...]')")
    return argv


def _quote_problem(error: ValueError) -> str:
    message = str(error)
    if "quotation" in message:
        return "unbalanced quote: no closing quotation"
    return f"cannot split the command: {message.lower()}"


def call_spec(text: str) -> tuple[str, str, list[Any]]:
    """A call job's module, function (a dotted path in the module) and arguments."""
    parts = text.split(None, 1)
    target = parts[0] if parts else ""
    rest = parts[1] if len(parts) > 1 else ""
    if not target or _TARGET.fullmatch(target) is None:
        shown = f" {target!r}" if target else ""
        raise CommandError(f"call: expected 'call module:function [JSON ARGS...]', got"
                           f"{shown or ' nothing'}")
    module, function = target.split(":", 1)
    return module, function, json_values(rest)


def json_values(text: str) -> list[Any]:
    """JSON values separated by blanks: `"in.png" 640 {"q": 9}`; a `#` where a value would
    start begins a comment."""
    values: list[Any] = []
    at = _BLANK.match(text).end()  # type: ignore[union-attr]  # \s* always matches
    while at < len(text) and text[at] != "#":
        try:
            value, end = _JSON.raw_decode(text, at)
        except json.JSONDecodeError:
            word = text[at:].split(None, 1)[0]
            raise CommandError(f"call: argument {len(values) + 1} ({word!r}) is not a JSON "
                               "value (a string needs double quotes: \"in.png\")") from None
        if end < len(text) and not text[end].isspace():
            raise CommandError(f"call: argument {len(values) + 1} is not followed by a blank "
                               f"(at {text[end:end + 10]!r})")
        values.append(value)
        at = _BLANK.match(text, end).end()  # type: ignore[union-attr]
    return values
