"""Training callbacks that report a running job into the database: progress, events, checkpoints, and the
cancel/pause requests the API leaves in `Job.requested_action`.

The reporter knows nothing of Celery. Every write is conditional on this worker still holding the job
(`worker_id` and a running status); when one matches no row the job was taken away, the reporter stops
the run and writes nothing more. Progress and metrics events are buffered and written at most every
`progress_interval_s`, so a fast run does not turn into one commit per step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from api.core.db import session_scope
from api.core.ids import new_id
from api.core.job_states import JobStatus
from api.core.storage import Storage
from api.core.tables import Job, JobEvent, now
from svfit_core.training import TrainingCallbacks
from worker import publishing

log = logging.getLogger(__name__)

# Cap on buffered events while the database is unreachable; beyond it the oldest metrics are dropped
# (the run itself matters more than its per-step log).
_MAX_BUFFERED_EVENTS = 10_000

# What a metrics event carries from the library's step and eval metrics. A DPO run's loss is DPO's and its
# accuracy the share of pairs ranked right; it adds the implicit rewards (beta x log-ratio to the reference) of
# the preferred and the non-preferred answer and their margin. A reinforcement run reports no accuracy (null)
# and adds the mean grade of its sampled answers (`reward`), the KL estimate to the starting model and the
# answers' mean length in tokens; its evaluations have a reward and no loss. A key the run did not report is
# left out.
TRAIN_METRICS = ("train_loss", "train_mean_token_accuracy")
VALID_METRICS = ("valid_loss", "valid_mean_token_accuracy")
REWARD_METRICS = ("reward_margin", "chosen_reward", "rejected_reward", "reward", "kl", "answer_tokens")


class JobLost(Exception):
    """This worker no longer holds the job (reaped or finished elsewhere); stop without writing."""


def add_event(
    session: Session, job_id: str, message: str, *, level: str = "info", type: str = "message", data: dict | None = None
) -> JobEvent:
    event = JobEvent(id=new_id("ftevent"), job_id=job_id, level=level, type=type, message=message, data=data)
    session.add(event)
    return event


def owned(job_id: str, worker_id: str):  # noqa: ANN201 - a SQLAlchemy UPDATE
    """An UPDATE of the job that matches only while `worker_id` still runs it."""
    return update(Job).where(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.RUNNING)


def _finite(value: Any) -> Any:
    # JSON has no NaN/Inf; a diverged loss is reported as null rather than breaking the write.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _reported(metrics: dict[str, Any], split: str) -> dict[str, Any]:
    """The `split` ("train" or "valid") metrics an event carries: loss and accuracy always (null when absent),
    a DPO run's rewards when it reported them."""
    reported = {key: _finite(metrics.get(key)) for key in (TRAIN_METRICS if split == "train" else VALID_METRICS)}
    for name in REWARD_METRICS:
        key = f"{split}_{name}"
        if key in metrics:
            reported[key] = _finite(metrics[key])
    return reported


def _margin_note(reported: dict[str, Any], split: str) -> str:
    margin = reported.get(f"{split}_reward_margin")
    reward = reported.get(f"{split}_reward")
    if margin is not None:
        return f", reward margin={margin:.4f}"
    return f", mean reward={reward:.4f}" if reward is not None else ""


class JobReporter(TrainingCallbacks):
    """Reports one attempt of one job. `resumed_step` is the checkpoint step this attempt resumes from."""

    def __init__(
        self,
        job: Job,
        worker_id: str,
        *,
        storage: Storage,
        model_name: str,
        progress_interval_s: float,
        control_poll_interval_s: float,
        lost: Callable[[], bool] = lambda: False,
        shutdown: Callable[[], bool] = lambda: False,
        resumed_step: int | None = None,
        keep_epochs: int = 0,
        keep_steps: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.job = job
        self.job_id = job.id
        self.worker_id = worker_id
        self.storage = storage
        self.model_name = model_name
        self.progress_interval_s = progress_interval_s
        self.control_poll_interval_s = control_poll_interval_s
        self._lost = lost
        self._shutdown = shutdown
        self.resumed_step = resumed_step
        self.keep_epochs, self.keep_steps = keep_epochs, keep_steps  # checkpoint retention; 0 keeps all
        self._clock = clock

        # Why the run was asked to stop: "cancel" | "pause" (the user), "shutdown" (the worker is stopping),
        # "lost" (the job was taken away). None while it runs.
        self.stop_reason: str | None = None
        self.total_steps: int | None = None
        self.step = resumed_step or 0
        self.epoch: float | None = None
        self.trained_tokens = 0
        self.last_train: dict[str, Any] = {}
        self.last_valid: dict[str, Any] = {}
        self.published_steps: set[int] = set()
        self._events: list[dict[str, Any]] = []
        self._progress_dirty = False
        self._last_flush = -math.inf
        self._last_poll = -math.inf
        self._t0: float | None = None
        self._step0 = self.step

    # --- TrainingCallbacks -------------------------------------------------------------------------------

    def on_start(self, info: dict[str, Any]) -> None:
        self.total_steps = info.get("total_steps")
        self._t0 = self._clock()
        # Progress always carries a number for the epoch (clients read it as a float): 0 on a fresh start,
        # and on a resume the position the checkpoint implies (steps are spread evenly over the epochs).
        n_epochs = (self.job.hyperparameters or {}).get("n_epochs")
        if self.resumed_step and self.total_steps and n_epochs:
            self.epoch = self.resumed_step * n_epochs / self.total_steps
        else:
            self.epoch = 0.0
        # What will actually run: the job's hyperparameters plus the library's resolved method and config
        # (default targets, learning rates, schedule), so the event log answers "what did it train with?"; and
        # the pre-flight's device memory estimate by part, which says what a larger job would cost.
        keys = ("total_steps", "task", "method", "device", "num_examples", "truncated_examples", "trainable_params",
                "label_names", "config", "memory_estimate")
        data = {key: info[key] for key in keys if info.get(key) is not None}
        data["hyperparameters"] = self.job.hyperparameters
        data["peft"] = info.get("peft") or self.job.peft
        if self.resumed_step:
            message = f"Fine-tuning job resumed from step {self.resumed_step}"
        else:
            message = "Fine-tuning job started"
        self._queue_event(message, data=data)
        truncated = info.get("truncated_examples") or 0
        if truncated:
            self._queue_event(
                f"{truncated} training examples were longer than the maximum sequence length and were truncated",
                level="warn",
            )
        self._progress_dirty = True
        self.flush()

    def on_setup_progress(self, done: int, total: int) -> None:
        # One event per matrix would be hundreds on a large model: report as often as progress is written,
        # and the last one always.
        if done == total or self._due():
            self._queue_event(f"Setting up bases: {done}/{total} matrices", data={"done": done, "total": total})
            self.flush()

    def on_step(self, metrics: dict[str, Any]) -> None:
        self.step = int(metrics["step"])
        self.total_steps = metrics.get("total_steps", self.total_steps)
        self.epoch = metrics.get("epoch", self.epoch)
        self.trained_tokens = metrics.get("trained_tokens", self.trained_tokens) or 0
        self.last_train = _reported(metrics, "train")
        loss = self.last_train["train_loss"]
        self._queue_event(
            f"Step {self.step}/{self.total_steps}: training loss={loss:.4f}{_margin_note(self.last_train, 'train')}"
            if loss is not None else f"Step {self.step}/{self.total_steps}",
            type="metrics",
            data={"step": self.step, "total_steps": self.total_steps, **self.last_train},
        )
        self._progress_dirty = True
        if self._due() or self.step == self.total_steps:
            self.flush()

    def on_eval(self, metrics: dict[str, Any]) -> None:
        step = int(metrics.get("step", self.step))
        self.last_valid = _reported(metrics, "valid")
        loss = self.last_valid["valid_loss"]
        self._queue_event(
            f"Step {step}/{self.total_steps}: validation loss={loss:.4f}{_margin_note(self.last_valid, 'valid')}"
            if loss is not None else f"Step {step}/{self.total_steps}: validation{_margin_note(self.last_valid, 'valid')}",
            type="metrics",
            data={"step": step, "total_steps": self.total_steps, **self.last_valid},
        )
        if self._due():
            self.flush()

    def on_checkpoint(self, step: int, path: Path, epoch_end: bool = False) -> None:
        self.flush()
        self.publish_checkpoint(int(step), Path(path), kind="epoch" if epoch_end else "step")

    def should_stop(self) -> str:
        if self.stop_reason is None:
            self.stop_reason = self._poll()
        if self.stop_reason in ("cancel", "lost"):
            return "cancel"
        if self.stop_reason in ("pause", "shutdown"):
            # A worker shutdown pauses the run too: the library saves a checkpoint, then the pipeline
            # re-queues the job instead of marking it paused.
            return "pause"
        return "continue"

    # --- helpers the pipeline also uses ------------------------------------------------------------------

    def publish_checkpoint(self, step: int, path: Path, kind: str = "step") -> None:
        """Copy a checkpoint into the store and record it (rows, last_checkpoint_step); idempotent per step.
        Then the checkpoints it supersedes go (retention: settings.checkpoint_keep_epochs / _steps)."""
        if step in self.published_steps:
            return
        metrics = {"step": step, **self.last_train, **self.last_valid}
        publishing.publish_dir(
            self.storage,
            path,
            publishing.checkpoint_key(self.job_id, step),
            {
                "job_id": self.job_id,
                "step": step,
                "fine_tuned_model": publishing.checkpoint_model_name(self.model_name, step),
            },
            kind="checkpoint",
        )
        try:
            with session_scope() as session:
                self._claimed_update(session, last_checkpoint_step=step, heartbeat_at=time.time())
                publishing.ensure_checkpoint_rows(session, self.job, step, metrics, self.model_name, kind)
                add_event(session, self.job_id, f"Checkpoint created at step {step}", data={"step": step})
                superseded = publishing.superseded_checkpoints(
                    session, self.job_id, keep_epochs=self.keep_epochs, keep_steps=self.keep_steps,
                    resume_step=step,
                )
                deleted_keys = publishing.delete_checkpoints(session, superseded)
        except JobLost:
            self._mark_lost()
            return
        self.published_steps.add(step)
        # After the commit: a crash between the two leaves only unreferenced files in the store, and so does
        # a store that cannot be reached now (training goes on; the files are merely not reclaimed).
        for key in deleted_keys:
            try:
                self.storage.delete(key)
            except Exception:  # noqa: BLE001 - whatever the backend raises; retention is best effort
                log.warning("could not delete superseded checkpoint %s", key, exc_info=True)

    def flush(self) -> None:
        """Write buffered events and the latest progress in one transaction (best effort on DB errors)."""
        if not self._events and not self._progress_dirty:
            return
        self._last_flush = self._clock()
        values: dict[str, Any] = {}
        if self._progress_dirty:
            remaining = self._seconds_remaining()
            values["progress"] = {
                "step": self.step,
                "total_steps": self.total_steps,
                "epoch": self.epoch,
                "seconds_remaining": remaining,
            }
            values["estimated_finish"] = now() + int(remaining) if remaining is not None else None
        try:
            with session_scope() as session:
                self._claimed_update(session, **values)
                for event in self._events:
                    session.add(JobEvent(id=new_id("ftevent"), job_id=self.job_id, **event))
        except JobLost:
            self._events.clear()
            self._mark_lost()
            return
        except SQLAlchemyError:
            # Progress is advisory; keep the events for the next flush and let training go on. A database
            # that stays away shows up as a stale heartbeat, which the reaper handles.
            log.warning("progress write for job %s failed; will retry", self.job_id, exc_info=True)
            del self._events[:-_MAX_BUFFERED_EVENTS]
            return
        self._events.clear()
        self._progress_dirty = False

    # --- internals ---------------------------------------------------------------------------------------

    def _claimed_update(self, session: Session, **values: Any) -> None:
        if not values:
            # Still check ownership: events of a job this worker lost must not be written.
            values = {"worker_id": self.worker_id}
        if session.execute(owned(self.job_id, self.worker_id).values(**values)).rowcount != 1:
            raise JobLost(self.job_id)

    def _queue_event(
        self, message: str, *, level: str = "info", type: str = "message", data: dict | None = None
    ) -> None:
        self._events.append(
            {"message": message, "level": level, "type": type, "data": data, "created_at": now()}
        )

    def _due(self) -> bool:
        return self._clock() - self._last_flush >= self.progress_interval_s

    def _seconds_remaining(self) -> int | None:
        if self._t0 is None or not self.total_steps:
            return None
        done = self.step - self._step0
        if done <= 0:
            return None
        rate = done / max(self._clock() - self._t0, 1e-6)  # steps per second in this attempt
        return max(0, math.ceil((self.total_steps - self.step) / rate))

    def _mark_lost(self) -> None:
        log.warning("job %s is no longer held by worker %s", self.job_id, self.worker_id)
        self.stop_reason = "lost"

    def _poll(self) -> str | None:
        if self._lost():
            return "lost"
        if self._shutdown():
            return "shutdown"
        if self._clock() - self._last_poll < self.control_poll_interval_s:
            return None
        self._last_poll = self._clock()
        try:
            with session_scope() as session:
                row = session.execute(
                    select(Job.requested_action, Job.status, Job.worker_id).where(Job.id == self.job_id)
                ).one_or_none()
        except SQLAlchemyError:
            log.warning("could not read requested_action for job %s", self.job_id, exc_info=True)
            return None
        if row is None or row.status != JobStatus.RUNNING or row.worker_id != self.worker_id:
            return "lost"
        if row.requested_action in ("cancel", "pause"):
            return row.requested_action
        return None
