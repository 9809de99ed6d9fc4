"""The job-state rules (api/core/job_states.py) hold together, and no code names a job status but that module.

That every transition the service performs is one the rules allow is tested on a live service in
tests/worker/test_transitions.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from api.core.job_states import (
    CANCELLABLE_AT_ONCE,
    PAUSABLE_AT_ONCE,
    TERMINAL,
    TRANSITIONS,
    UNFINISHED,
    WAITING,
    JobStatus,
    can_transition,
)

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("api", "worker", "svfit_core", "svfit_cli", "benchmarks", "dashboard")
STATES_MODULE = Path("api/core/job_states.py")
# Strings spelled like a status that are not one: (file, string) -> why. None today.
NOT_JOB_STATUSES: dict[tuple[Path, str], str] = {}
STATUS_SPELLINGS = {status.value for status in JobStatus} | {"validating_files"}


def test_every_status_has_rules_and_nothing_leads_back_to_before_creation():
    assert set(TRANSITIONS) == {None, *JobStatus}
    assert TRANSITIONS[None] == {JobStatus.QUEUED}, "a job is created queued"
    assert all(None not in targets for targets in TRANSITIONS.values())


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_a_terminal_status_has_no_way_out(status):
    assert TRANSITIONS[status] == frozenset()
    assert not any(can_transition(status, other) for other in JobStatus)


@pytest.mark.parametrize("status", sorted(UNFINISHED))
def test_every_unfinished_status_can_still_finish(status):
    reached, frontier = {status}, [status]
    while frontier:
        for target in TRANSITIONS[frontier.pop()] - reached:
            reached.add(target)
            frontier.append(target)
    assert reached & TERMINAL == TERMINAL


def test_the_groups_agree_with_the_rules():
    assert UNFINISHED | TERMINAL == set(JobStatus) and not UNFINISHED & TERMINAL
    assert WAITING == {JobStatus.QUEUED}
    # The API moves these itself, so they must be states the rules let it move; a running job is only asked.
    assert all(can_transition(status, JobStatus.CANCELLED) for status in CANCELLABLE_AT_ONCE)
    assert all(can_transition(status, JobStatus.PAUSED) for status in PAUSABLE_AT_ONCE)
    assert JobStatus.RUNNING not in CANCELLABLE_AT_ONCE | PAUSABLE_AT_ONCE
    assert CANCELLABLE_AT_ONCE | PAUSABLE_AT_ONCE <= UNFINISHED


def test_can_transition_takes_the_strings_rows_hold_and_refuses_unknown_ones():
    assert can_transition("queued", "running") and can_transition(None, "queued")
    assert not can_transition("running", "running")
    assert not can_transition("validating_files", "queued") and not can_transition("queued", "validating_files")
    assert JobStatus("queued") == "queued" and f"{JobStatus.RUNNING}" == "running"


def status_literals(source: str) -> list[tuple[int, str]]:
    """(line, string) of every string constant spelled exactly like a job status, f-string parts included."""
    return [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in STATUS_SPELLINGS
    ]


def test_the_scan_finds_quoted_and_f_string_statuses_but_not_prose():
    source = "a = 'queued'\nb = \"paused\"\nc = f\"running\"\nd = 'Job cancelled.'\ne = f'{a} failed'\n"
    assert status_literals(source) == [(1, "queued"), (2, "paused"), (3, "running")]


def test_no_job_status_literal_outside_the_states_module():
    found = []
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if relative == STATES_MODULE:
                continue
            for line, value in status_literals(path.read_text(encoding="utf-8")):
                if (relative, value) not in NOT_JOB_STATUSES:
                    found.append(f"{relative}:{line}: {value!r}")
    assert not found, "use api.core.job_states.JobStatus instead:\n" + "\n".join(found)
