"""`taskpool run --cmd TEMPLATE`: each input line (a job file's or standard input's) is data
for one sh command: {} the whole line, {1} {2} ... its fields, {#} the job id, each quoted
for the shell. A {n} past a line's last field: `taskpool: FILE:LINE: reason`, exit 2,
nothing run (a job file), or the line skipped and reported (standard input)."""

from __future__ import annotations

from pathlib import Path

from taskpool.observe import events as ev

from harness import PoolRun, read_results, results_by_job, write_job_file


def test_cmd_runs_the_template_on_each_line_of_a_job_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    names = ["plain.csv", "with space.csv", "it's.csv", "$(touch pwned).csv"]
    for name in names:
        (data / name).write_text(name * 100)
    jobs = write_job_file(tmp_path, [str(data / name) for name in names])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--cmd", "gzip -9 {}",
                   "--results", str(results)], events=tmp_path / "e.jsonl")
    assert run.finish() == 0
    assert sorted(p.name for p in data.iterdir()) == sorted(f"{n}.gz" for n in names)
    assert not list(tmp_path.rglob("pwned"))  # a line is data, never a command of its own
    assert {r["status"] for r in results_by_job(results).values()} == {"done"}


def test_fields_and_the_job_id_are_substituted(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    jobs = write_job_file(tmp_path, ["alpha beta", "", "gamma  delta epsilon"])
    run = PoolRun(["--workers", "2", "--jobs", str(jobs),
                   "--cmd", f"printf %s {{2}}-{{1}}-{{#}} > {out}/{{#}}"],
                  events=tmp_path / "e.jsonl")
    assert run.finish() == 0
    # The blank line is no job: ids count the lines that make jobs.
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "1": "beta-alpha-1", "2": "delta-gamma-2"}


def test_the_whole_line_is_data_options_included(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["timeout=5 sh x # not a comment"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "1", "--jobs", str(jobs), "--cmd", "echo",
                   "--results", str(results)], events=tmp_path / "e.jsonl")
    assert run.finish() == 0
    record = results_by_job(results)[1]
    assert record["arg"] == "echo 'timeout=5 sh x # not a comment'"
    assert record["status"] == "done"


def test_a_field_past_the_end_of_a_job_files_line_runs_nothing(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["a b", "c", "d e"])
    run = PoolRun(["--workers", "1", "--jobs", str(jobs), "--cmd", "echo {2}"],
                  events=tmp_path / "e.jsonl")
    assert run.finish() == 2
    assert f"taskpool: {jobs}:2: " in run.log_text()
    assert not run.events_named(ev.JOB_SENT)


def test_a_field_past_the_end_of_a_stdin_line_skips_that_line(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "1", "--cmd", "echo {2}", "--results", str(results)],
                  stdin=b"a b\nc\nd e\n", events=tmp_path / "e.jsonl")
    assert run.finish() == 2
    assert "taskpool: <stdin>:2: " in run.log_text()
    assert [r["arg"] for r in read_results(results)] == ["echo b", "echo e"]


def test_job_ids_are_stable_for_a_line_on_resume(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["ok", "bad", "fine"])
    journal, results = tmp_path / "run.db", tmp_path / "r.jsonl"
    base = ["--workers", "2", "--jobs", str(jobs), "--cmd", "test {} != bad && echo {#}",
            "--journal", str(journal), "--results", str(results)]
    assert PoolRun(base, events=tmp_path / "e1.jsonl").finish() == 1
    assert {j: r["status"] for j, r in results_by_job(results).items()} == {
        1: "done", 2: "failed", 3: "done"}
    again = PoolRun([*base, "--resume", "--retry-failed"], events=tmp_path / "e2.jsonl")
    assert again.finish() == 1  # "bad" fails again, as the same job 2
    # Job 2 alone runs again (twice: --retry-failed also retries it in this run).
    assert {e["job"] for e in again.events_named(ev.JOB_SENT)} == {2}
    jobs.write_text("ok\ngood\nfine\n")  # a changed line is another job: refused
    assert PoolRun([*base, "--resume", "--retry-failed"]).finish() == 2
