"""A fine-tuning job's states: the `JobStatus` type, the named groups of states the service acts on, and
which state may follow which. Every job status in the code comes from here.

There is no `validating_files` state (OpenAI's first): files are validated line by line at upload and a job
is refused at creation if its file failed, so a job starts `queued`.
"""

from __future__ import annotations

import enum


# A StrEnum: stored and sent as its value and equal to it, so a status read back from a row as a plain
# string compares equal to its member.
class JobStatus(enum.StrEnum):
    """The state of a fine-tuning job."""

    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Finished for good: nothing moves a job out of these.
TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
UNFINISHED = frozenset(JobStatus) - TERMINAL
# In line for a worker: each such job needs a message in the broker.
WAITING = frozenset({JobStatus.QUEUED})
# No worker holds these, so the API moves them itself. A running job is only asked (`requested_action`):
# its worker acts within a step and writes the new status.
CANCELLABLE_AT_ONCE = frozenset({JobStatus.QUEUED, JobStatus.PAUSED})
PAUSABLE_AT_ONCE = frozenset({JobStatus.QUEUED})

# Which status may follow which; `None` is a job not created yet. The API and the worker each change a
# job only with a conditional UPDATE from one of these states to one it allows.
TRANSITIONS: dict[JobStatus | None, frozenset[JobStatus]] = {
    None: frozenset({JobStatus.QUEUED}),
    # A worker claims it; the API pauses or cancels it before one does.
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.CANCELLED}),
    # Queued again when its worker stops (shutdown, database loss) or is reaped; the rest are the worker's
    # outcomes, or the reaper finishing a stale job's pending cancel/pause or its last attempt.
    JobStatus.RUNNING: frozenset(
        {JobStatus.QUEUED, JobStatus.PAUSED, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    # Resumed (back in line), or cancelled.
    JobStatus.PAUSED: frozenset({JobStatus.QUEUED, JobStatus.CANCELLED}),
    **{status: frozenset() for status in TERMINAL},
}


def can_transition(current: JobStatus | str | None, new: JobStatus | str) -> bool:
    """Whether a job in `current` (None: not created yet) may move to `new`. Unknown strings may not."""
    try:
        source = None if current is None else JobStatus(current)
        target = JobStatus(new)
    except ValueError:
        return False
    return target in TRANSITIONS[source]
