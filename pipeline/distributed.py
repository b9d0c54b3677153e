"""Ray: evaluation shards and matrix cells spread over a cluster (``pip install 'rexport[ray]'``).

Ray is imported only here, inside functions. Every node must see the run directories and the data
at the same paths (a shared filesystem) and have rexport installed. A worker that dies is retried
by Ray (``max_retries``); each attempt is logged with a small actor, so retries are counted in the
result; a task that fails for good fails the stage with its reason.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import uuid
from typing import Any, Callable, Iterator

import numpy as np

from rexport.core.errors import InputError, MissingDependency, RexportError, first_line

#: how often Ray reruns a task whose worker died (a node lost, a process killed)
MAX_RETRIES = 3
#: named attempt logs start with this (a test finds a running shard's worker through it)
ATTEMPT_LOG_PREFIX = "rexport-attempts-"


class ShardFailed(RexportError):
    """A Ray task failed for good (after Ray's retries): the stage fails with its reason."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise MissingDependency("--ray needs Ray, which is not installed",
                                "pip install 'rexport[ray]'  (or: pip install ray)") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray, connected: an existing connection is kept; else ``address`` ("default": ray.init()'s own
    choice, which joins a cluster started on this machine or starts a local one). What this opened,
    it shuts down."""
    ray = import_ray()
    opened = False
    if not ray.is_initialized():
        try:
            ray.init(address=None if address in (None, "default") else address, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise InputError(f"cannot connect to the Ray cluster at {address}: {first_line(e, 200)}",
                             "start one with 'ray start --head' or pass its address, e.g. --ray 10.0.0.1:6379") \
                from None
        opened = True
    try:
        yield ray
    finally:
        if opened:
            ray.shutdown()


class AttemptLog:
    """A tiny actor: every task attempt registers here first (retries = attempts - tasks)."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def start(self, task: int, pid: int, host: str) -> None:
        self.seen.append({"task": task, "pid": pid, "host": host})

    def attempts(self) -> list[dict]:
        return list(self.seen)


def run_tasks(ray, fn: Callable, calls: list[tuple], *, what: str,
              options: list[dict] | None = None) -> tuple[list, dict]:
    """Run ``fn(attempt_log, index, *args)`` for each args tuple as Ray tasks; return the results in
    order and what it took (tasks, attempts, retries, hosts). A task that fails for good raises
    ShardFailed (or the InputError the task raised), naming which ``what`` failed and why."""
    log = ray.remote(AttemptLog).options(name=ATTEMPT_LOG_PREFIX + uuid.uuid4().hex[:12], num_cpus=0).remote()
    remote = ray.remote(fn)
    refs = [remote.options(max_retries=MAX_RETRIES, **((options or [{}] * len(calls))[i])).remote(log, i, *args)
            for i, args in enumerate(calls)]
    results = []
    try:
        for i, ref in enumerate(refs):
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, InputError):
                    raise InputError(f"{what} {i} on Ray: {cause.message}", cause.hint) from None
                reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(e).splitlines()[-1]
                raise ShardFailed(f"{what} {i} of {len(refs)} failed on Ray: {reason[:300]}") from None
            except ray.exceptions.RayError as e:  # the worker died more often than Ray retries
                raise ShardFailed(f"{what} {i} of {len(refs)} failed on Ray after {MAX_RETRIES} retries: "
                                  f"{type(e).__name__}: {first_line(e, 200)}") from None
        attempts = ray.get(log.attempts.remote())
    finally:
        for ref in refs[len(results):]:
            ray.cancel(ref, force=True)
        ray.kill(log)
    info = {"tasks": len(refs), "attempts": len(attempts), "retries": len(attempts) - len(refs),
            "hosts": sorted({a["host"] for a in attempts})}
    return results, info


def register_attempt(ray, log, index: int) -> None:
    ray.get(log.start.remote(index, os.getpid(), socket.gethostname()))


def enter_driver_cwd(cwd: str) -> None:
    """Relative paths recorded in a manifest (a checkpoint, data) mean what they meant to the driver."""
    if os.path.isdir(cwd):
        os.chdir(cwd)


# -- evaluation --------------------------------------------------------------------------

def _evaluate_shard(log, index: int, cwd: str, run_path: str, settings: dict, variants: list[str], lo: int,
                    hi: int, threads: int):
    """One shard on a Ray worker: the groups lo..hi of the labelled set, every variant loaded once."""
    import ray

    from rexport.pipeline.evaluate import EvaluateSettings, open_labelled_set, predict
    from rexport.pipeline.manifest import RunDir

    register_attempt(ray, log, index)
    enter_driver_cwd(cwd)
    run = RunDir(run_path)
    if not run.manifest_path.exists():
        raise InputError(f"run directory {run_path} is not visible on {socket.gethostname()}",
                         "put run directories and data on a filesystem every Ray node mounts at the same path")
    s = EvaluateSettings(**settings)
    data = open_labelled_set(run, s)
    p = predict(run, data, variants, data.groups(s.batch_size)[lo:hi], decode_workers=0, threads=threads)
    return p.kept, p.top


def predict_on_ray(run, settings, variants: list[str], n_groups: int):
    """The evaluation pass sharded over Ray by whole batches, merged in order: the same batches as a
    local pass, so the same predictions bit for bit."""
    from rexport.pipeline.evaluate import TOPK, Predictions

    with ray_session(settings.ray) as ray:
        shards = settings.ray_shards or max(1, int(ray.cluster_resources().get("CPU", 1)))
        bounds = [b for b in np.array_split(np.arange(n_groups), min(shards, n_groups)) if len(b)]
        local = dataclasses.replace(settings, ray=None, ray_shards=None)
        calls = [(os.getcwd(), str(run.path.resolve()), dataclasses.asdict(local), variants, int(b[0]),
                  int(b[-1]) + 1, 1) for b in bounds]
        results, info = run_tasks(ray, _evaluate_shard, calls, what="evaluation shard",
                                  options=[{"num_cpus": 1}] * len(calls))
    kept = np.concatenate([k for k, _ in results])
    empty = np.zeros((0, TOPK), np.int32)
    top = {v: np.concatenate([t[v] for _, t in results]) if results else empty for v in variants}
    return Predictions(kept=kept, top=top, info={"address": settings.ray, "shards": len(calls),
                                                 "attempts": info["attempts"], "retries": info["retries"],
                                                 "hosts": info["hosts"]})
