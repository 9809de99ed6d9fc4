"""Data parallelism for one run: starting the processes of a multi-device run, each rank's share of a step,
and the few collectives the loop needs (a step's gradient and metric sums, rank 0's decisions).

``launch`` runs rank 0 in the caller's process, where the callbacks live, and spawns ranks 1 … N-1; they meet
through a TCP store on a loopback port. Every rank then runs the same loop on its own device (``cuda:{rank}``
over NCCL, or the CPU over gloo): it loads the base and builds U and V itself, so only the trainable
parameters' gradients and a few numbers per step travel between processes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from svfit_core.errors import ConfigError, InsufficientDevicesError, RankFailedError, SVFitError

__all__ = ["SOLO", "PeerFailedError", "Ranks", "device_type", "in_group", "joined", "launch"]

BACKENDS = {"cuda": "nccl", "cpu": "gloo"}
LOOPBACK = "127.0.0.1"
# How long a rank waits at a collective for the others. Long, because one rank may work alone meanwhile:
# rank 0 computing every basis of a large model, or its callbacks publishing a full fine-tune's checkpoint.
COLLECTIVE_TIMEOUT = timedelta(hours=1)
# How long rank 0 gives the other processes to exit once the run is over, or once a failure has reached it.
EXIT_GRACE_S = 60.0
# Gradients are summed in buckets of about this size: one collective per bucket, and never a second copy of
# all of a large model's gradients at once (full fine-tuning).
BUCKET_BYTES = 64 * 2**20


class PeerFailedError(RuntimeError):
    """A collective failed because another rank did (it stopped, or could not compute its share of a step);
    that rank's own error is the one to report."""


@contextlib.contextmanager
def _collective() -> Iterator[None]:
    # gloo reports a peer that died as a bare RuntimeError; naming it lets rank 0 look for the peer's error.
    try:
        yield
    except RuntimeError as exc:
        raise PeerFailedError(f"a collective failed: {exc}") from exc


@dataclass(frozen=True)
class Ranks:
    """This process's place in its run: rank ``rank`` of ``world_size``, whose collectives use tensors on
    ``device``. ``SOLO`` (a run in one process) makes every collective a no-op."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the caller's process, where the callbacks report, and the only one that writes files."""
        return self.rank == 0

    def share(self, items: list[int]) -> list[int]:
        """This rank's part of a step's examples: every world_size-th, so shares differ by at most one."""
        return items[self.rank :: self.world_size]

    def decide(self, value: str, choices: Sequence[str]) -> str:
        """Rank 0's ``value`` (one of ``choices``) on every rank, so all ranks act on one decision at once."""
        if self.world_size == 1:
            return value
        index = torch.tensor([choices.index(value)], device=self.device)
        with _collective():
            dist.broadcast(index, src=0)
        return choices[int(index.item())]

    def copy_from_main(self, params: list[torch.Tensor]) -> None:
        """Give every rank rank 0's values of ``params``, as DDP does at its start: they are built alike on
        every rank, but a head initialised on another device is not trusted to match bit for bit."""
        if self.world_size == 1:
            return
        with _collective():
            for param in params:
                dist.broadcast(param.data, src=0)

    def seed_step(self, seed: int, step: int) -> None:
        """Seed this rank's dropout for optimizer step ``step``: each rank draws its own masks, and a resumed
        run draws the same ones with no rank's RNG state in the checkpoint."""
        if self.world_size > 1:
            torch.manual_seed(int(np.random.SeedSequence([seed, step, self.rank]).generate_state(1)[0]))

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the ranks (in float64: counts stay exact up to 2^53)."""
        if self.world_size == 1:
            return list(values)
        totals = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        with _collective():
            dist.all_reduce(totals)
        return totals.tolist()

    def sum_step(
        self, params: list[torch.Tensor], sums: Sequence[float], failure: BaseException | None
    ) -> list[float]:
        """End a step on all ranks together: ``sums`` (this rank's loss sum, correct predictions, tokens) and
        every parameter's gradient summed over the ranks, in place.

        ``failure`` is why this rank could not compute its share. Every rank then raises, that one its own
        error and the others ``PeerFailedError``, instead of waiting for it at the next collective.
        """
        if self.world_size == 1:
            if failure is not None:
                raise failure
            return list(sums)
        # A parameter no rank gave a gradient keeps None, as in one process, where AdamW then skips it.
        totals = self.sum([*sums, failure is not None, *(p.grad is not None for p in params)])
        if totals[len(sums)] > 0:
            if failure is not None:
                raise failure
            raise PeerFailedError("another rank failed at this step")
        touched = [p for p, count in zip(params, totals[len(sums) + 1 :], strict=True) if count > 0]
        for bucket in _buckets(touched):
            # A rank whose share was empty has no gradient yet: it adds zeros.
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
            flat = torch.cat([g.reshape(-1) for g in grads])
            with _collective():
                dist.all_reduce(flat)
            for param, part in zip(bucket, flat.split([g.numel() for g in grads]), strict=True):
                param.grad = part.view_as(param)
        return totals[: len(sums)]


SOLO = Ranks()


def _buckets(params: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """``params`` in order, in runs of one dtype of at most ``BUCKET_BYTES`` (a larger tensor goes alone)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for param in params:
        nbytes = param.numel() * param.element_size()
        if bucket and (param.dtype != bucket[0].dtype or size + nbytes > BUCKET_BYTES):
            yield bucket
            bucket, size = [], 0
        bucket.append(param)
        size += nbytes
    if bucket:
        yield bucket


# -- the processes of a run -------------------------------------------------------------------------------


def device_type(requested: str | None, world_size: int) -> str:
    """What the ``world_size`` ranks of a run train on: the CPU when ``requested``, else CUDA, one GPU per
    rank, all of which this process must see."""
    if requested == "cpu":
        return "cpu"
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < world_size:
        raise InsufficientDevicesError(
            f"this run trains in {world_size} processes with one GPU each, but this process sees {visible} "
            "(CUDA_VISIBLE_DEVICES decides which GPUs a process sees)",
            requested=world_size, visible=visible,
        )
    return "cuda"


def in_group() -> bool:
    """Whether this process is already a rank of a process group (one ``launch`` started, or torchrun's)."""
    return dist.is_available() and dist.is_initialized()


def joined(world_size: int, requested: str | None) -> Ranks:
    """This process's ``Ranks`` in the default process group, whose ranks are processes of this machine:
    rank i trains on ``cuda:i``."""
    if dist.get_world_size() != world_size:
        raise ConfigError(
            f"the run asks for world_size {world_size} but its process group has {dist.get_world_size()} "
            "processes", code="world_size_mismatch",
        )
    rank = dist.get_rank()
    kind = device_type(requested, world_size)
    return Ranks(rank, world_size, torch.device(kind, rank) if kind == "cuda" else torch.device("cpu"))


def launch(target: Callable[..., Any], world_size: int, kind: str, callbacks: Any, **kwargs: Any) -> Any:
    """``target(**kwargs, callbacks=callbacks)`` as rank 0 of ``world_size`` in this process, and
    ``target(**kwargs)`` as ranks 1 … N-1 in processes started here, on devices of ``kind``; returns rank 0's
    result.

    A failure on one rank reaches the others as a failed collective; what is raised here is the error of the
    rank where it started (``RankFailedError`` with its code, for a library error on another rank).
    """
    # Port 0: the OS picks a free port as the store binds it, so two runs on one machine never race for one.
    store = dist.TCPStore(LOOPBACK, 0, world_size, is_master=True, timeout=COLLECTIVE_TIMEOUT,
                          wait_for_workers=False)
    # Spawned, not forked: a fork would inherit this process's CUDA context, threads and open connections.
    context = multiprocessing.get_context("spawn")
    reports = context.SimpleQueue()
    children: list[multiprocessing.process.BaseProcess] = []
    try:
        for rank in range(1, world_size):
            child = context.Process(
                target=_run_rank, name=f"svfit-rank-{rank}", daemon=True,
                args=(rank, world_size, store.port, kind, torch.get_num_threads(), target, kwargs, reports),
            )
            child.start()
            children.append(child)
        _await_children(store, children)
        _join_group(store, 0, world_size, kind)
        try:
            result = target(**kwargs, callbacks=callbacks)
        finally:
            dist.destroy_process_group()
    except BaseException as exc:
        collective = _collective_failure(exc)
        # Destroying the group above ends the others' collectives (with gloo at once); give them time to
        # report only when the failure came from one of them.
        failures = _stop(children, reports, grace=EXIT_GRACE_S if collective else 0.0)
        origin = next((error for error, only_peer in failures if not only_peer), None)
        if collective and origin is not None:
            raise origin from exc
        raise
    failures = _stop(children, reports, grace=EXIT_GRACE_S)
    if failures:
        # Rank 0 finished, so every rank should have: one that failed means the ranks fell out of step.
        raise failures[0][0]
    return result


def _await_children(store: dist.TCPStore, children: list[multiprocessing.process.BaseProcess]) -> None:
    """Wait until every child has started and reached the store: one that dies before (an import or a CUDA
    error) must fail the run now, not leave rank 0 waiting for it at the rendezvous for COLLECTIVE_TIMEOUT."""
    keys = [f"started/{rank}" for rank in range(1, len(children) + 1)]
    deadline = time.monotonic() + COLLECTIVE_TIMEOUT.total_seconds()
    while not store.check(keys):
        for child in children:
            if child.exitcode is not None:
                raise RuntimeError(f"{child.name} exited with code {child.exitcode} while starting")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the rank processes did not start within {COLLECTIVE_TIMEOUT}")
        time.sleep(0.05)


def _join_group(store: dist.TCPStore, rank: int, world_size: int, kind: str) -> None:
    if kind == "cuda":
        torch.cuda.set_device(rank)  # NCCL binds each rank's communicator to its current device
    dist.init_process_group(BACKENDS[kind], store=store, rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)


def _run_rank(
    rank: int,
    world_size: int,
    port: int,
    kind: str,
    threads: int,
    target: Callable[..., Any],
    kwargs: dict[str, Any],
    reports: Any,
) -> None:
    """A spawned rank: join the group, run ``target`` without callbacks, and tell rank 0 how it ended."""
    # A terminal's Ctrl-C reaches every process of its group, but only rank 0 decides how the run stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The caller's thread budget, not torch's default of every core in each process.
    torch.set_num_threads(threads)
    try:
        store = dist.TCPStore(LOOPBACK, port, world_size, is_master=False, timeout=COLLECTIVE_TIMEOUT)
        store.set(f"started/{rank}", "1")
        _join_group(store, rank, world_size, kind)
        try:
            target(**kwargs)
        finally:
            dist.destroy_process_group()
    except BaseException as exc:
        code = exc.code if isinstance(exc, SVFitError) else None
        message = exc.message if isinstance(exc, SVFitError) else f"{type(exc).__name__}: {exc}"
        reports.put((rank, (_collective_failure(exc), code, message)))
        raise
    reports.put((rank, None))


def _collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` only says that another rank failed, not why."""
    return isinstance(exc, PeerFailedError)


def _stop(
    children: list[multiprocessing.process.BaseProcess], reports: Any, grace: float
) -> list[tuple[BaseException, bool]]:
    """Wait up to ``grace`` seconds for the children to exit and kill those still running -> the error of
    each child that failed, in rank order, and whether it only says that another rank failed."""
    deadline = time.monotonic() + grace
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
    killed = set()
    for child in children:
        if child.is_alive():
            child.kill()
            child.join()
            killed.add(child.name)
    reported: dict[int, tuple | None] = {}
    while not reports.empty():
        rank, report = reports.get()
        reported[rank] = report
    failures: list[tuple[BaseException, bool]] = []
    for rank, child in enumerate(children, start=1):
        report = reported.get(rank)
        if report is not None:
            only_peer, code, message = report
            error = RankFailedError(message, rank=rank, code=code) if code else RuntimeError(f"rank {rank}: {message}")
            failures.append((error, only_peer))
        elif rank not in reported and child.name not in killed and child.exitcode != 0:
            # Ended without a word (killed for memory, a segfault): nothing else says where the run broke.
            failures.append((RuntimeError(f"rank {rank}'s process ended with exit code {child.exitcode}"), False))
    return failures
