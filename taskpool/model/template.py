"""`taskpool run --cmd TEMPLATE`: the xargs/GNU parallel habit. Each input line is data for
one `sh` job, made by filling TEMPLATE's placeholders:

    {}     the whole line (its end of line dropped)
    {1}    the line's first whitespace-separated field; {2} the second, ...
    {#}    the job's id: its place among the input's jobs (1, 2, ...; blank lines are not
           jobs), the same for the same line of the same input on --resume

Each substitution is quoted for the shell (shlex.quote), so a file name with a blank or a
quote is one word, and nothing in a line can run as a command of its own. A template with
no placeholder gets ` {}` appended, as GNU parallel appends its argument. The line is data
only: `timeout=5` in it is text, not an option. Any other brace (`${HOME}`, `{a,b}`) is
the shell's.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

_PLACEHOLDER = re.compile(r"\{(\d*|#)\}")


class TemplateError(ValueError):
    """Why a template, or a line for it, cannot make a command; its text is for people."""


@dataclass(frozen=True)
class CommandTemplate:
    text: str  # with ` {}` appended if it had no placeholder

    @classmethod
    def parse(cls, text: str) -> CommandTemplate:
        """TemplateError for an empty template or a field numbered 0."""
        if not text.strip():
            raise TemplateError("an empty command")
        found = _PLACEHOLDER.findall(text)
        if any(f.isdigit() and int(f) == 0 for f in found):
            raise TemplateError("{0}: fields are numbered from 1 ({} is the whole line)")
        return cls(text if found else f"{text} {{}}")

    def fill(self, line: str, job_id: int) -> str:
        """The command for one input line; TemplateError if it names a field the line has
        not."""
        fields = line.split()

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name == "":
                return shlex.quote(line)
            if name == "#":
                return str(job_id)
            number = int(name)
            if number > len(fields):
                have = f"{len(fields)} field" + ("" if len(fields) == 1 else "s")
                raise TemplateError(f"--cmd's {{{number}}} is past the end of this line "
                                    f"(it has {have})")
            return shlex.quote(fields[number - 1])

        return _PLACEHOLDER.sub(substitute, self.text)
