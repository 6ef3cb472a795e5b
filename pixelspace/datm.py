"""DATM: Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory Matching (ICLR 2024).

MTT's matching (same normalised loss and unrolled student, :func:`pixelspace.mtt.match_trajectory`) plus,
as in ``distill/DATM.py`` (docs/METHODS.md §5):
- difficulty-aligned start epochs: start ~ U[min_start_epoch, upper) where, with sequential generation,
  upper = current_max_start_epoch + int((max_start_epoch - current_max_start_epoch) * it / expansion_end_epoch)
  grows to max_start_epoch during distillation;
- initialisation from real images an expert (last snapshot) classifies correctly, cycling experts;
- soft labels: per image, the mean expert logits over the experts that predict its class, then learned
  with SGD(lr_y, momentum_y) through the soft cross-entropy of the student steps;
- images, lr and labels are only stepped when the matching loss is <= ``threshold``.

Differences from the reference, by necessity: experts come from the shared SGD buffer (``pixelspace.experts``)
instead of GSAM-trained ones, and ZCA is not supported (evaluation trains on mean/std-normalised pixels).
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from distill.errors import DistillError
from distill.methods.base import DistilledSet, Method, RunContext
from pixelspace.experts import ExpertBuffer, FlatModel
from pixelspace.mtt import (
    IMG_MOMENTUM,
    SyntheticOptimizer,
    TrajectoryParams,
    check_common,
    dsa_strategy,
    get_buffer,
    loss_summary,
    make_plan,
    make_step_loss,
    match_trajectory,
    resolve,
    student_dtype,
    usable_lr,
)
from pixelspace.synthetic import LoopState

# utils/cfg.py defaults and configs/*/ConvIN/IPC*.yaml (docs/METHODS.md §5).
DATM_DEFAULTS: dict[str, Any] = dict(
    syn_steps=80, expert_epochs=2, max_start_epoch=25, min_start_epoch=0, current_max_start_epoch=20,
    sequential_generation=True, expansion_end_epoch=3000, lr_img=1000.0, lr_lr=1e-5, lr_teacher=0.01, lr_y=2.0,
    batch_syn=None, threshold=1.0, pix_init="samples_predicted_correctly",
)
_SEQ = dict(sequential_generation=True)
_FIXED = dict(sequential_generation=False)
DATM_TABLE: dict[tuple[str, int], dict[str, Any]] = {
    ("cifar10", 1): dict(syn_steps=80, expert_epochs=2, lr_img=100.0, lr_lr=1e-7, lr_y=5.0, batch_syn=10,
                         min_start_epoch=0, max_start_epoch=4, threshold=1.1, **_FIXED),
    ("cifar10", 10): dict(syn_steps=80, expert_epochs=2, lr_img=100.0, lr_lr=1e-5, lr_y=2.0, batch_syn=100,
                          min_start_epoch=0, current_max_start_epoch=10, max_start_epoch=20, expansion_end_epoch=1000,
                          **_SEQ),
    ("cifar10", 50): dict(syn_steps=80, expert_epochs=2, lr_img=1000.0, lr_lr=1e-5, lr_y=2.0, batch_syn=500,
                          min_start_epoch=0, current_max_start_epoch=20, max_start_epoch=40, expansion_end_epoch=2000,
                          **_SEQ),
    ("cifar10", 500): dict(syn_steps=40, expert_epochs=2, lr_img=50.0, lr_lr=1e-5, lr_y=10.0, batch_syn=1000,
                           min_start_epoch=40, max_start_epoch=60, **_FIXED),
    ("cifar10", 1000): dict(syn_steps=100, expert_epochs=2, lr_img=50.0, lr_lr=1e-5, lr_y=10.0, batch_syn=1000,
                            min_start_epoch=40, max_start_epoch=60, **_FIXED),
    ("cifar100", 1): dict(syn_steps=40, expert_epochs=3, lr_img=1000.0, lr_lr=1e-5, lr_y=10.0, batch_syn=1000,
                          min_start_epoch=0, current_max_start_epoch=10, max_start_epoch=20, expansion_end_epoch=1000,
                          **_SEQ),
    ("cifar100", 10): dict(syn_steps=80, expert_epochs=2, lr_img=1000.0, lr_lr=1e-5, lr_y=10.0, batch_syn=1000,
                           min_start_epoch=0, current_max_start_epoch=30, max_start_epoch=50, expansion_end_epoch=2000,
                           **_SEQ),
    ("cifar100", 50): dict(syn_steps=80, expert_epochs=2, lr_img=1000.0, lr_lr=1e-5, lr_y=10.0, batch_syn=1000,
                           min_start_epoch=20, max_start_epoch=70, pix_init="real", **_FIXED),
    ("cifar100", 100): dict(syn_steps=80, expert_epochs=2, lr_img=50.0, lr_lr=1e-5, lr_y=10.0, batch_syn=1000,
                            min_start_epoch=30, max_start_epoch=70, **_FIXED),
}


class DATMParams(TrajectoryParams):
    pix_init: Literal["samples_predicted_correctly", "real", "noise"] | None = Field(  # type: ignore[assignment]
        None, description="'samples_predicted_correctly' (default): real images an expert classifies correctly; "
        "'real': random real images; 'noise'")
    min_start_epoch: int | None = Field(None, ge=0, description="Lower bound of the start epoch (default 0)")
    current_max_start_epoch: int | None = Field(None, ge=1, description="Initial upper bound of the start epoch "
                                                "with sequential generation (default 20)")
    sequential_generation: bool | None = Field(None, description="Grow the upper bound from current_max_start_epoch "
                                               "to max_start_epoch over expansion_end_epoch iterations (default true)")
    expansion_end_epoch: int | None = Field(None, ge=1, description="Iteration at which the upper bound reaches "
                                            "max_start_epoch (default 3000)")
    lr_y: float | None = Field(None, ge=0, description="SGD lr on the soft-label logits (default 2.0)")
    momentum_y: float = Field(0.9, ge=0, lt=1, description="Momentum of the soft-label optimiser (Momentum_y 0.9)")
    threshold: float | None = Field(None, gt=0, description="Skip the update when the matching loss exceeds this "
                                    "(default 1.0)")
    soft_labels: bool = Field(True, description="Learn soft labels initialised from expert logits (false: hard CE)")
    label_experts: int | None = Field(None, ge=1, description="Experts whose logits initialise the soft labels "
                                      "(default: all experts in the buffer)")
    expert_train_epochs: int = Field(100, ge=1, description="Epochs per expert (DATM README --train_epochs 100)")


# ------------------------------------------------------------------------------------------------ init
@torch.no_grad()
def _expert_logits(buffer: ExpertBuffer, ctx: RunContext, experts: list[int], images01: torch.Tensor) -> torch.Tensor:
    """E x N logits of the experts' last snapshots on pixel-scale images."""
    net = buffer.build_net(ctx.dataset).to(ctx.device).eval()
    model = FlatModel(net)
    x = ctx.normalize(images01.to(ctx.device))
    out = []
    for e in experts:
        theta = buffer.snapshot(e, buffer.epochs).to(ctx.device)
        out.append(torch.cat([model(theta, chunk) for chunk in x.split(500)]).cpu())
    return torch.stack(out)


def init_correct(ctx: RunContext, buffer: ExpertBuffer, rng: np.random.Generator, chunk: int = 256) -> tuple[torch.Tensor, int]:
    """Per class, the first ipc real images (random order) that expert 0 classifies correctly, cycling
    through further experts for the rest; any shortfall is filled with the remaining images (counted)."""
    images, short = [], 0
    for c in range(ctx.num_classes):
        idx = ctx.train.class_indices(c)
        idx = idx[rng.permutation(len(idx))]
        chosen: list[int] = []
        taken = np.zeros(len(idx), dtype=bool)
        for e in range(buffer.num_experts):
            rest = np.flatnonzero(~taken)
            for s in range(0, len(rest), chunk):
                if len(chosen) >= ctx.ipc:
                    break
                part = rest[s : s + chunk]
                pixels = ctx.train.load(idx[part]).float().div_(255.0)
                pred = _expert_logits(buffer, ctx, [e], pixels)[0].argmax(1).numpy()
                for j in part[pred == c][: ctx.ipc - len(chosen)]:
                    chosen.append(int(j))
                    taken[j] = True
            if len(chosen) >= ctx.ipc:
                break
        if len(chosen) < ctx.ipc:
            fill = np.flatnonzero(~taken)[: ctx.ipc - len(chosen)]
            short += len(fill)
            chosen.extend(int(j) for j in fill)
        images.append(ctx.train.load(idx[chosen]).float().div_(255.0))
    return torch.cat(images), short


def init_soft_labels(ctx: RunContext, buffer: ExpertBuffer, images01: torch.Tensor, labels: torch.Tensor,
                     label_experts: int | None) -> tuple[torch.Tensor, int]:
    """Mean expert logits over the experts predicting each image's class (all experts where none does)."""
    experts = list(range(min(label_experts or buffer.num_experts, buffer.num_experts)))
    logits = _expert_logits(buffer, ctx, experts, images01)  # E x N x C
    correct = (logits.argmax(2) == labels.view(1, -1)).float()  # E x N
    count = correct.sum(0)
    mean_correct = (logits * correct.unsqueeze(2)).sum(0) / count.clamp_min(1).unsqueeze(1)
    fallback = count == 0
    mean_correct[fallback] = logits.mean(0)[fallback]
    return mean_correct, int(fallback.sum())


def upper_bound(resolved: dict[str, Any], it: int, max_start: int) -> int:
    """DATM's floating upper bound of the start epoch (L485-491), capped at the usable maximum."""
    if not resolved["sequential_generation"]:
        return max_start
    cur = resolved["current_max_start_epoch"]
    upper = cur + int((resolved["max_start_epoch"] - cur) * it / resolved["expansion_end_epoch"])
    return min(upper, max_start)


# ------------------------------------------------------------------------------------------------ method
class DifficultyAlignedTrajectoryMatching(Method[DATMParams]):
    name: ClassVar[str] = "datm"
    summary: ClassVar[str] = "Trajectory matching with difficulty-aligned start epochs and learned soft labels (ICLR 2024)"
    family: ClassVar[str] = "pixel"
    Params = DATMParams

    def run(self, ctx: RunContext, params: DATMParams) -> DistilledSet:
        resolved = resolve(params, DATM_TABLE, DATM_DEFAULTS, ctx.dataset.name, ctx.ipc)
        if params.zca:
            raise DistillError("zca=true is not supported: distill evaluation trains on mean/std-normalised pixels")
        buffer = get_buffer(ctx, params)
        max_start = check_common(params, resolved, buffer.epochs, ctx.log)
        min_start = min(resolved["min_start_epoch"], max_start - 1)
        device = ctx.device
        rng = np.random.default_rng(ctx.seed + 29)
        generator = ctx.generator(31)

        def initial() -> dict[str, Any]:
            labels = torch.arange(ctx.num_classes).repeat_interleave(ctx.ipc)
            shortfall = 0
            if resolved["pix_init"] == "samples_predicted_correctly":
                pixels, shortfall = init_correct(ctx, buffer, rng)
            else:
                pixels = torch.cat([ctx.class_images(c, limit=ctx.ipc, rng=rng) for c in range(ctx.num_classes)])
            if params.soft_labels:
                soft, fallback = init_soft_labels(ctx, buffer, pixels, labels, params.label_experts)
            else:
                soft, fallback = None, 0
            return {"pixels": pixels, "labels": labels, "soft": soft, "init_shortfall": shortfall,
                    "label_fallback": fallback}

        init = ctx.checkpoints.stage("init", initial)
        pixels, labels = init["pixels"], init["labels"].to(device)
        if resolved["pix_init"] == "noise":
            images = torch.randn(pixels.shape, generator=generator)
        else:
            images = ctx.normalize(pixels)
        images = images.to(device).requires_grad_(True)
        syn_lr = torch.tensor(float(resolved["lr_teacher"]), device=device).requires_grad_(True)
        groups = [(images, resolved["lr_img"], IMG_MOMENTUM), (syn_lr, resolved["lr_lr"], IMG_MOMENTUM)]
        label_syn = None
        if init["soft"] is not None:
            label_syn = init["soft"].clone().to(device).requires_grad_(True)
            groups.append((label_syn, resolved["lr_y"], params.momentum_y))
        optimizer = SyntheticOptimizer(groups)

        model = FlatModel(buffer.build_net(ctx.dataset).to(device))
        strategy = dsa_strategy(params, ctx.dataset.digits)
        dtype = student_dtype(params.student_precision, device)
        batch_syn = resolved["batch_syn"] or len(images)
        syn_steps = resolved["syn_steps"]
        history: list[float] = []
        skipped: list[int] = []  # iterations whose loss was above the threshold (no update)
        iter_seconds: list[float] = []
        tensors = {"images": images, "syn_lr": syn_lr} | ({"label_syn": label_syn} if label_syn is not None else {})
        state = LoopState(tensors, {"synthetic": optimizer}, generator, history, numpy_rng=rng,
                          lists={"skipped": skipped})
        for it in ctx.resumable_steps(params.iterations, "distill", state, ctx.run_key(self.name, params)):
            t0 = time.perf_counter()
            upper = max(upper_bound(resolved, it, max_start), min_start + 1)
            start_epoch = int(rng.integers(min_start, upper))
            expert = int(rng.integers(0, buffer.num_experts))
            start = buffer.snapshot(expert, start_epoch).to(device)
            target = buffer.snapshot(expert, start_epoch + resolved["expert_epochs"]).to(device)
            plan = make_plan(len(images), syn_steps, batch_syn, generator)
            targets = label_syn if label_syn is not None else labels
            step_loss = make_step_loss(model, images, targets, plan, strategy, soft=label_syn is not None, dtype=dtype)
            leaves = [images] + ([label_syn] if label_syn is not None else [])
            result = match_trajectory(step_loss, start, target, syn_lr, leaves, syn_steps, params.memory_efficient)
            if not math.isfinite(result.loss):
                raise DistillError(f"DATM loss became {result.loss} at iteration {it}: lower lr_img, lr_lr or lr_y")
            history.append(result.loss)
            if result.loss <= resolved["threshold"]:
                grads = [result.grads[0], result.grad_lr] + ([result.grads[1]] if label_syn is not None else [])
                optimizer.step(grads)
            else:
                skipped.append(it)
            iter_seconds.append(time.perf_counter() - t0)
            if it % 10 == 0:
                ctx.log(f"datm it {it}: loss {result.loss:.4f} start<{upper} syn_lr {float(syn_lr.detach()):.5f}")

        learned_lr = float(syn_lr.detach())
        return DistilledSet(
            images=ctx.dataset.denormalize(images.detach().cpu()),
            labels=labels.cpu(),
            soft_labels=label_syn.detach().cpu() if label_syn is not None else None,
            learned_lr=usable_lr(learned_lr, ctx.log),
            metrics={
                "resolved": resolved | {"max_start_epoch_used": max_start, "min_start_epoch_used": min_start,
                                        "batch_syn_used": batch_syn},
                "buffer": buffer.folder.name,
                "experts_in_buffer": buffer.num_experts,
                "learned_lr": learned_lr,
                "skipped_updates": len(skipped),
                "init_shortfall": init["init_shortfall"],
                "label_fallback": init["label_fallback"],
                "seconds_per_iteration": round(float(np.median(iter_seconds)), 4) if iter_seconds else None,
                **loss_summary(history),
            },
            extras={"loss_curve": torch.tensor(history)},
        )
