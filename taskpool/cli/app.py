"""`taskpool COMMAND ...`: parse the command line and hand it to its command.

    options.py   the parser, every flag and its value type
    run.py       run, dispatch: the arguments to a RunConfig, run by an engine
    commands.py  report, results
    errors.py    `taskpool: <where>: <reason>` for people
"""

from __future__ import annotations

from collections.abc import Sequence

from taskpool.cli.commands import make_report, print_results
from taskpool.cli.options import REPORT_FORMATS, build_parser
from taskpool.cli.run import run_command


def main(argv: Sequence[str] | None = None, started_at: float | None = None) -> int:
    parser = build_parser()
    args = parser.parse_command_line(argv)
    args.started_at = started_at
    if args.command == "results":
        return print_results(args.journal, args.format, args.status)
    if args.command == "report":
        return make_report(args.events, args.output or REPORT_FORMATS[args.format],
                           args.format)
    # Its own usage errors are said under its own usage (`taskpool run: error: ...`).
    return run_command(args, parser.commands[args.command])
