"""Registers ``slow-test``, a real (tiny) method with a checkpointed stage followed by a slow stage.

Loaded into the API and worker processes through DISTILL_PLUGINS, so tests can kill a worker or cancel a job
while it is reliably mid-run, and check that a resumed attempt reuses the checkpoint of the first attempt.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from pydantic import Field

from distill.errors import DistillError
from distill.methods.base import DistilledSet, Method, MethodParams, RunContext
from distill.methods.registry import METHODS


class SlowParams(MethodParams):
    iterations: int = Field(20, ge=1, le=10_000, description="steps of the slow stage")
    step_seconds: float = Field(0.1, ge=0, le=60, description="sleep per step")


class SlowSelection(Method):
    name = "slow-test"
    summary = "random selection, then a slow checkpoint-free stage (service tests only)"
    family = "baseline"
    Params = SlowParams

    def run(self, ctx: RunContext, params: MethodParams) -> DistilledSet:
        assert isinstance(params, SlowParams)

        def pick() -> dict:
            rng = np.random.default_rng(ctx.seed)
            chosen = [np.sort(rng.choice(ctx.train.class_indices(c), size=ctx.ipc, replace=False))
                      for c in range(ctx.num_classes)]
            return {"indices": np.concatenate(chosen), "pid": os.getpid()}

        picked = ctx.checkpoints.stage("pick", pick)
        for _ in ctx.steps(params.iterations, "wait", every=1):
            time.sleep(params.step_seconds)
        indices = picked["indices"]
        images = ctx.train.load(indices).float().div_(255.0)
        labels = torch.from_numpy(ctx.train.labels[indices].copy())
        return DistilledSet(images=images, labels=labels,
                            metrics={"pick_pid": picked["pid"], "run_pid": os.getpid()})


class FanoutSelection(Method):
    """Random selection whose per-class picks go through ``ctx.executor.map`` when an executor is present."""

    name = "fanout-test"
    summary = "random selection fanned out per class over ctx.executor (service tests only)"
    family = "baseline"
    fans_out = True
    Params = MethodParams

    def run(self, ctx: RunContext, params: MethodParams) -> DistilledSet:
        labels, ipc, seed = ctx.train.labels, ctx.ipc, ctx.seed

        def pick(label: int) -> tuple[np.ndarray, int]:
            rng = np.random.default_rng(seed + label)
            return np.sort(rng.choice(np.flatnonzero(labels == label), size=ipc, replace=False)), os.getpid()

        if ctx.executor is not None:
            results = ctx.executor.map(pick, range(ctx.num_classes), num_gpus=1)
        else:
            results = [pick(c) for c in range(ctx.num_classes)]
        indices = np.concatenate([r[0] for r in results])
        images = ctx.train.load(indices).float().div_(255.0)
        return DistilledSet(images=images, labels=torch.from_numpy(labels[indices].copy()), metrics={
            "executor": type(ctx.executor).__name__, "task_pids": sorted({r[1] for r in results}),
            "run_pid": os.getpid()})


class FailingSelection(Method):
    """Checkpoints a stage, then fails as a bad request would (a job that ends without success)."""

    name = "fail-test"
    summary = "checkpoints a stage, then fails (service tests only)"
    family = "baseline"
    Params = MethodParams

    def run(self, ctx: RunContext, params: MethodParams) -> DistilledSet:
        ctx.checkpoints.stage("pick", lambda: {"pid": os.getpid()})
        raise DistillError("deliberate failure after a checkpoint")


METHODS.setdefault("slow-test", f"{__name__}:SlowSelection")
METHODS.setdefault("fail-test", f"{__name__}:FailingSelection")
METHODS.setdefault("fanout-test", f"{__name__}:FanoutSelection")
