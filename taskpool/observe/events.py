"""The vocabulary of `--events`: every event name any role emits, declared once.

Emitters pass these to `log.event()`/`log.job_event()`; the live view, the report and the
tests read them back by the same names. An event's fields are its JSON object's keys beside
``t``, ``event``, ``role``, ``pid``, ``level`` and ``text`` (see `log.as_event`).

    name                 who emits it                  fields
    dealer_started       Dealer                        workers, pools
    dealer_stopped       Dealer, Dask engine
    dask_connecting      Dask engine                   scheduler, timeout
    dask_started         Dask engine                   scheduler, workers, own_cluster[, threads]
    dask_worker_joined   Dask engine (--scheduler)     address, workers
    dask_no_worker       Dask engine (--scheduler)     wait
    worker_started       worker
    worker_shutdown      worker
    simulated_crash      worker                        job, step, attempt
    initializer_failed   worker (Executor)             reason
    job_sent             Dealer                        job, worker, attempt, kind, arg (null:
                                                       sh, exec, call), type,
                                                       priority[, pool: a typed pool's label]
                                                       [, again, from_worker: why it is sent
                                                       again (resent, requeued, preempted,
                                                       moved) and the worker it left]
    job_started          Dealer (on an Ack), Dask      job, worker, attempt
    job_finished         worker (typed pools)          job
    job_done             Dealer, Dask engine           job, worker, attempt, result
                                                       [, exit_status: sh, exec]
                                                       [, sent_before_death: from a worker
                                                       already reaped]
    job_failed           Supervisor; Dealer (sh, exec, job, worker, attempts, reason
                         call that ran and failed)     [, exit_status: sh, exec]
    job_resent           Recovery                      job, worker, reason
    job_requeued         Recovery                      job, worker, reason
    job_split            Recovery (Executor batches)   job, worker, reason, jobs
    job_taken_back       Dealer (the scheduler)        job, worker
    job_preempted        Dealer (the scheduler)        job, worker, ...
    job_abandoned        Supervisor (Dask)             job, worker, reason
    jobs_not_done        Supervisor                    jobs, worker, reason
    duplicate_dropped    Dealer                        job, worker
    worker_exited        Supervisor                    worker, type, reason, crash[, address,
                                                       jobs: Dask, the jobs it was running]
    worker_killed        Supervisor; Dask (at close)   worker, reason
    gave_up              Supervisor                    reason
    halted               Dealer, Dask engine           when, failed, jobs, reason, running,
                                                       not_started
    all_jobs_completed   Dealer                        jobs
    interrupted          Main                          signal
    interrupted_again    Main                          signal, rung (2: running jobs
                                                       stopped, 3: the pool killed)
    stopping             Dealer, Dask engine           running, grace[, not_started]
    grace_over           Dask engine                   running
    role_lost            Main                          lost, lost_pid, how
    input_unread         Main                          last_line
    run_resumed          Main (--resume)               done, failed, jobs (None: stdin),
                                                       journal
    fork_refused         Supervisor                    live, size, reason
    table_header         Main
    pool_summary         Main                          type, workers, done, failed, ...
    attempts_histogram   Main                          attempts
    summary              Main                          jobs, done, failed, not_done, ...
"""

from __future__ import annotations

DEALER_STARTED = "dealer_started"
DEALER_STOPPED = "dealer_stopped"
DASK_CONNECTING = "dask_connecting"
DASK_STARTED = "dask_started"
DASK_WORKER_JOINED = "dask_worker_joined"
DASK_NO_WORKER = "dask_no_worker"
WORKER_STARTED = "worker_started"
WORKER_SHUTDOWN = "worker_shutdown"
SIMULATED_CRASH = "simulated_crash"
INITIALIZER_FAILED = "initializer_failed"
JOB_SENT = "job_sent"
JOB_STARTED = "job_started"
JOB_FINISHED = "job_finished"
JOB_DONE = "job_done"
JOB_FAILED = "job_failed"
JOB_RESENT = "job_resent"
JOB_REQUEUED = "job_requeued"
JOB_SPLIT = "job_split"
JOB_TAKEN_BACK = "job_taken_back"
JOB_PREEMPTED = "job_preempted"
JOB_ABANDONED = "job_abandoned"
JOBS_NOT_DONE = "jobs_not_done"
DUPLICATE_DROPPED = "duplicate_dropped"
WORKER_EXITED = "worker_exited"
WORKER_KILLED = "worker_killed"
GAVE_UP = "gave_up"
HALTED = "halted"
ALL_JOBS_COMPLETED = "all_jobs_completed"
INTERRUPTED = "interrupted"
INTERRUPTED_AGAIN = "interrupted_again"
STOPPING = "stopping"
GRACE_OVER = "grace_over"
ROLE_LOST = "role_lost"
INPUT_UNREAD = "input_unread"
RUN_RESUMED = "run_resumed"
FORK_REFUSED = "fork_refused"
TABLE_HEADER = "table_header"
POOL_SUMMARY = "pool_summary"
ATTEMPTS_HISTOGRAM = "attempts_histogram"
SUMMARY = "summary"

# "log": a log line that is no event of its own kind (see log.as_event).
LOG = "log"

NAMES = frozenset(value for key, value in list(globals().items())
                  if key.isupper() and isinstance(value, str))
