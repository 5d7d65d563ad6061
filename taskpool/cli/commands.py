"""`taskpool report` and `taskpool results`: the commands that run nothing."""

from __future__ import annotations

import csv
import json
import sys
from typing import IO, Any

from taskpool.cli.errors import error
from taskpool.core.journal import Journal, JournalError
from taskpool.model.exits import EXIT_BAD_INPUT
from taskpool.model.outcome import JobRecord, Status

CSV_FIELDS = ["job", "kind", "arg", "type", "priority", "status", "result", "worker",
              "attempts", "reason"]


def make_report(events: str, output: str, form: str = "html") -> int:
    """`taskpool report FILE.jsonl [--format html|trace] -o OUT`; returns the exit status."""
    from taskpool.observe.timeline import ReportError

    if form == "trace":
        from taskpool.observe.trace import write_trace as write
    else:
        from taskpool.observe.report import write_report as write
    try:
        timeline = write(events, output)
    except ReportError as e:
        error(str(e))
        return EXIT_BAD_INPUT
    print(f"{output}: {len(timeline.workers)} workers, {len(timeline.attempts)} attempts, "
          f"{len(timeline.links)} resends")
    return 0


def print_results(path: str, form: str, statuses: list[str] | None = None) -> int:
    """`taskpool results RUN.db --format FORM [--status S]...`: every job of the journal
    (or those of the statuses asked), with its outcome or not_done; returns the exit
    status."""
    try:
        journal = Journal.open(path, resume=True, for_run=False)
        try:
            outcomes = journal.outcomes()
            jobs = journal.all_jobs()
        finally:
            journal.close()
    except JournalError as e:
        error(str(e))
        return EXIT_BAD_INPUT
    rows = [(outcomes.get(job_id) or JobRecord.of(job, Status.NOT_DONE)).to_json()
            for job_id, job in jobs.items()]
    every_job = len(rows)
    if statuses:
        rows = [row for row in rows if row["status"] in statuses]
    if form == "jsonl":
        sys.stdout.write("".join(json.dumps(row) + "\n" for row in rows))
    elif form == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    else:
        _write_table(sys.stdout, rows, every_job)
    return 0


SPEC_WIDTH_MAX = 48  # a longer command is cut, with "...": the row stays one line


def _spec(row: dict[str, Any]) -> str:
    return f"{row['kind']} {row['arg']}"


def _write_table(out: IO[str], rows: list[dict[str, Any]], every_job: int) -> None:
    """A row a job, then the counts (of the rows shown, out of the journal's jobs)."""
    specs = [_spec(row) for row in rows]
    # As wide as the longest spec (a command's text), within SPEC_WIDTH_MAX.
    width = min(max([18, *map(len, specs)]), SPEC_WIDTH_MAX)
    out.write(f"{'job':>6}  {'job spec':<{width}} {'status':<9} {'result':>14}  attempts\n")
    for row, spec in zip(rows, specs):
        if len(spec) > width:
            spec = spec[:width - 3] + "..."
        result = "" if row["result"] is None else str(row["result"])
        out.write(f"{row['job']:>6}  {spec:<{width}} {row['status']:<9} {result:>14}  "
                  f"{row['attempts']}\n")
    counts = {s: sum(1 for r in rows if r["status"] == s)
              for s in ("done", "failed", "not_done")}
    of_all = f" (of {every_job} in the journal)" if len(rows) < every_job else ""
    jobs = "1 job" if len(rows) == 1 else f"{len(rows)} jobs"
    out.write(f"{jobs}{of_all}: {counts['done']} done, {counts['failed']} failed, "
              f"{counts['not_done']} not done\n")
