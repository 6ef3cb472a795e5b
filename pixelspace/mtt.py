"""MTT: Dataset Distillation by Matching Training Trajectories (Cazenavette et al., CVPR 2022).

Per iteration: take an expert trajectory, a start epoch t < max_start_epoch, run ``syn_steps`` SGD steps of a
student (initialised at theta*_t) on the synthetic set with the learnable lr ``syn_lr``, and minimise
||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 (M = expert_epochs) w.r.t. the synthetic images
and ``syn_lr`` (reference ``distill.py`` L294-399). The student runs from one flat parameter vector through
``torch.func.functional_call``.

Two ways to get the gradient, both exact:
- ``memory_efficient=False``: the reference's way, one autograd graph over the whole unroll
  (``create_graph=True`` per step); memory grows linearly with ``syn_steps``.
- ``memory_efficient=True`` (TESLA-style constant memory): a forward sweep without graphs keeps only the flat
  parameter vectors theta_i, then a reverse sweep recomputes one step at a time and propagates the adjoint
  lambda_i = lambda_{i+1} - lr * H_i lambda_{i+1} with a Hessian-vector product, accumulating the image and lr
  gradients step by step. Activation memory is that of one step whatever ``syn_steps`` is (plus one flat
  vector per step). Unlike TESLA's closed form, which drops the dependence of later steps on earlier
  images, this is the same gradient as the full unroll (tested).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch.nn import functional as F

from distill.augment import diff_augment, strategy_for
from distill.errors import DistillError
from distill.methods.base import (
    DistilledSet,
    DsaStrategy,
    Method,
    MethodParams,
    NetworkName,
    RunContext,
    usable_learned_lr,
)
from pixelspace.experts import ExpertBuffer, ExpertSettings, FlatModel, ensure_buffer, experts_to_train
from pixelspace.precision import precision_dtype
from pixelspace.synthetic import LoopState

# DC-BENCH's "provided by the author" commands (docs/METHODS.md §4): (dataset, ipc) ->
# syn_steps, expert_epochs, max_start_epoch, lr_img, lr_lr, lr_teacher, batch_syn. Others use distill.py's defaults.
MTT_TABLE: dict[tuple[str, int], dict[str, Any]] = {
    ("cifar10", 1): dict(syn_steps=50, expert_epochs=2, max_start_epoch=2, lr_img=100.0, lr_lr=1e-7, lr_teacher=0.01),
    ("cifar10", 10): dict(syn_steps=30, expert_epochs=2, max_start_epoch=20, lr_img=100.0, lr_lr=1e-5, lr_teacher=0.001),
    ("cifar10", 50): dict(syn_steps=30, expert_epochs=2, max_start_epoch=40, lr_img=1000.0, lr_lr=1e-5, lr_teacher=0.001),
    ("cifar100", 1): dict(syn_steps=20, expert_epochs=3, max_start_epoch=20, lr_img=1000.0, lr_lr=1e-5, lr_teacher=0.01),
    ("cifar100", 10): dict(syn_steps=20, expert_epochs=2, max_start_epoch=20, lr_img=1000.0, lr_lr=1e-5, lr_teacher=0.01),
    ("cifar100", 50): dict(syn_steps=80, expert_epochs=2, max_start_epoch=40, lr_img=1000.0, lr_lr=1e-5, lr_teacher=0.01,
                           batch_syn=125),
    # ImageNet subsets at 128 px, all IPCs (the author, mtt-distillation issue #1): ImageNette here
    ("imagenette", 1): dict(syn_steps=20, expert_epochs=2, max_start_epoch=10, lr_img=100000.0, lr_lr=1e-6,
                            lr_teacher=0.01),
    ("imagenette", 10): dict(syn_steps=20, expert_epochs=2, max_start_epoch=10, lr_img=100000.0, lr_lr=1e-6,
                             lr_teacher=0.01, batch_syn=20),
}
MTT_DEFAULTS: dict[str, Any] = dict(syn_steps=20, expert_epochs=3, max_start_epoch=25, lr_img=1000.0, lr_lr=1e-5,
                                    lr_teacher=0.01, batch_syn=None)
IMG_MOMENTUM = 0.5  # SGD([image_syn], lr=lr_img, momentum=0.5) and SGD([syn_lr], lr=lr_lr, momentum=0.5)


# ------------------------------------------------------------------------------------------------ params
class TrajectoryParams(MethodParams):
    """Shared by MTT and DATM. ``None`` means: the reference's value for this dataset/IPC (MTT_TABLE /
    DATM_TABLE) when tabulated, else the reference script's default."""

    iterations: int = Field(5000, ge=0, description="Distillation iterations (reference --Iteration 5000)")
    syn_steps: int | None = Field(None, ge=1, description="Student SGD steps on the synthetic set per iteration "
                                  "(N; distill.py default 20, per-setting table otherwise)")
    expert_epochs: int | None = Field(None, ge=1, description="Expert epochs the student must cover (M; default 3)")
    max_start_epoch: int | None = Field(None, ge=1, description="Start epoch drawn from [0, max_start_epoch) "
                                        "(default 25; clamped to the buffer's length)")
    lr_img: float | None = Field(None, gt=0, description="SGD lr on the synthetic pixels, momentum 0.5 (default 1000)")
    lr_lr: float | None = Field(None, ge=0, description="SGD lr on the learnable student lr, momentum 0.5 (default 1e-5)")
    lr_teacher: float | None = Field(None, gt=0, description="Initial learnable student lr syn_lr (default 0.01)")
    batch_syn: int | None = Field(None, ge=1, description="Synthetic images per student step (default: the whole set)")
    pix_init: Literal["real", "noise"] = Field("real", description="Initialise from random real images or noise")
    dsa_strategy: DsaStrategy = Field("auto", description="DSA ops applied per sample in student steps; 'auto' = "
                              "color_crop_cutout_flip_scale_rotate (no flip for digits); 'none' disables")
    zca: bool = Field(False, description="ZCA whitening as in the reference's --zca. Not supported: distill "
                      "evaluation trains on mean/std-normalised pixels, so ZCA-space images would not transfer")
    memory_efficient: bool = Field(False, description="Constant-memory exact gradient (adjoint sweep, TESLA-style "
                                   "recomputation) instead of one graph over all syn_steps")
    student_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Arithmetic of the student's forward/backward passes in the unroll: 'fp32' as the "
        "reference; 'bf16' runs the network in bfloat16 while the parameter trajectory, the update and the "
        "matching loss stay fp32 (2.6x faster on CPUs with AVX512-BF16; measured image-gradient change 2.6 %, "
        "far below the change between two augmentation draws); 'auto' = bf16 on such CPUs and CUDA GPUs, fp32 elsewhere")
    experts: int = Field(100, ge=1, description="Expert trajectories in the buffer (buffer.py --num_experts 100); "
                         "trained once under DISTILL_HOME/experts when missing")
    expert_train_epochs: int = Field(50, ge=1, description="Epochs per expert (buffer.py --train_epochs 50); "
                                     "must be >= max_start_epoch + expert_epochs - 1")
    expert_model: NetworkName = Field("convnet", description="Expert and student network (ConvNet-3 IN in the reference)")
    expert_lr: float = Field(0.01, gt=0, description="Expert SGD lr (buffer.py --lr_teacher, momentum 0, no decay)")


class MTTParams(TrajectoryParams):
    pass


def resolve(params: TrajectoryParams, table: dict, defaults: dict, dataset: str, ipc: int) -> dict[str, Any]:
    """Fill ``None`` fields from the per-setting table or the defaults; explicit values always win. The table
    is keyed by the dataset's registered name without its resolution suffix (``imagenette@128`` -> imagenette)."""
    base = dict(defaults) | table.get((dataset.split("@")[0], ipc), {})
    out = {}
    for key, value in base.items():
        given = getattr(params, key, None)
        out[key] = value if given is None else given
    return out


# ------------------------------------------------------------------------------------------------ engine
@dataclass
class StepPlan:
    """The randomness of one unroll, fixed up front so a step can be recomputed exactly (adjoint sweep)."""

    indices: list[torch.Tensor]
    aug_seeds: list[int]


def make_plan(n_images: int, syn_steps: int, batch_syn: int, generator: torch.Generator) -> StepPlan:
    """Chunks of random permutations (popped from the end as the reference does) and per-step aug seeds."""
    indices: list[torch.Tensor] = []
    chunks: list[torch.Tensor] = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.split(torch.randperm(n_images, generator=generator), batch_syn))
        indices.append(chunks.pop())
    seeds = torch.randint(0, 2**62, (syn_steps,), generator=generator).tolist()
    return StepPlan(indices, seeds)


StepLoss = Callable[[torch.Tensor, int], torch.Tensor]


def make_step_loss(model: FlatModel, images: torch.Tensor, targets: torch.Tensor, plan: StepPlan, strategy: str,
                   soft: bool = False, dtype: torch.dtype | None = None) -> StepLoss:
    """Student loss at step i with parameters theta: CE on the step's augmented synthetic batch.

    ``targets`` are hard labels, or (``soft``) learnable logits whose softmax is the target (DATM's
    SoftCrossEntropy). Augmentation is per sample (non-Siamese), reproducible from the step's seed.
    ``dtype`` (e.g. torch.bfloat16): the network runs on ``theta`` and the batch cast to it; the cast is
    differentiable, so gradients reach the fp32 theta and images, and the loss is computed in fp32.
    """

    def step_loss(theta: torch.Tensor, i: int) -> torch.Tensor:
        idx = plan.indices[i]
        x = images[idx]
        if strategy != "none":
            x = diff_augment(x, strategy, generator=torch.Generator().manual_seed(plan.aug_seeds[i]))
        out = model(theta, x) if dtype is None else model(theta.to(dtype), x.to(dtype)).float()
        if soft:
            return -(F.softmax(targets[idx], dim=1) * F.log_softmax(out, dim=1)).sum(1).mean()
        return F.cross_entropy(out, targets[idx])

    return step_loss


@dataclass
class MatchResult:
    loss: float
    grads: list[torch.Tensor | None]  # one per leaf (images, labels ...)
    grad_lr: torch.Tensor
    param_dist: float


def match_trajectory(
    step_loss: StepLoss,
    start: torch.Tensor,
    target: torch.Tensor,
    syn_lr: torch.Tensor,
    leaves: list[torch.Tensor],
    syn_steps: int,
    memory_efficient: bool,
) -> MatchResult:
    """Normalised parameter-matching loss after ``syn_steps`` student steps and its gradients w.r.t. the
    ``leaves`` (synthetic images, soft labels) and the student lr ``syn_lr``."""
    start = start.detach()
    target = target.detach()
    param_dist = ((start - target) ** 2).sum()
    if float(param_dist) <= 0:
        raise DistillError("expert snapshots are identical (start == target): the expert buffer is broken")
    lr_leaf = syn_lr
    if not memory_efficient:
        theta = start.clone().requires_grad_(True)
        current = theta
        for i in range(syn_steps):
            ce = step_loss(current, i)
            (g,) = torch.autograd.grad(ce, current, create_graph=True)
            current = current - lr_leaf * g
        loss = ((current - target) ** 2).sum() / param_dist
        all_grads = torch.autograd.grad(loss, [lr_leaf, *leaves], allow_unused=True)
        return MatchResult(float(loss.detach()), list(all_grads[1:]), all_grads[0], float(param_dist))

    lr_value = syn_lr.detach()
    thetas = [start]
    for i in range(syn_steps):  # forward sweep: no graph kept, only the flat parameters
        theta = thetas[-1].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(step_loss(theta, i), theta)
        thetas.append((thetas[-1] - lr_value * g).detach())
    residual = thetas[-1] - target
    loss = (residual**2).sum() / param_dist
    adjoint = 2.0 * residual / param_dist  # dL/dtheta_N
    grad_lr = torch.zeros_like(lr_value)
    grads: list[torch.Tensor | None] = [None] * len(leaves)
    for i in reversed(range(syn_steps)):  # reverse sweep: one step's graph at a time
        theta = thetas[i].requires_grad_(True)
        (g,) = torch.autograd.grad(step_loss(theta, i), theta, create_graph=True)
        grad_lr = grad_lr - (adjoint * g.detach()).sum()
        wrt = [theta, *leaves] if i > 0 else list(leaves)  # the adjoint of theta_0 is never used
        back = torch.autograd.grad((g * adjoint).sum(), wrt, allow_unused=True)
        for k, gk in enumerate(back[1:] if i > 0 else back):
            if gk is not None:
                prev = grads[k]
                grads[k] = -lr_value * gk if prev is None else prev - lr_value * gk
        if i > 0:
            adjoint = adjoint - lr_value * back[0]
        thetas[i + 1] = None  # type: ignore[call-overload]  # free as we go
    return MatchResult(float(loss), grads, grad_lr, float(param_dist))


# ------------------------------------------------------------------------------------------------ shared run
def student_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The student's network dtype: None (fp32) or torch.bfloat16 (see ``student_precision``)."""
    return precision_dtype(precision, device, "student_precision")


def dsa_strategy(params: TrajectoryParams, digits: bool) -> str:
    return strategy_for(digits) if params.dsa_strategy == "auto" else params.dsa_strategy


def expert_settings(ctx: RunContext, params: TrajectoryParams) -> ExpertSettings:
    return ExpertSettings(dataset=ctx.dataset.name, model=params.expert_model, epochs=params.expert_train_epochs,
                          lr_teacher=params.expert_lr, max_per_class=ctx.max_per_class, seed=0)


def get_buffer(ctx: RunContext, params: TrajectoryParams) -> ExpertBuffer:
    """The job's expert buffer: reused when present, trained (with progress and cancellation) when not."""
    settings = expert_settings(ctx, params)
    missing = experts_to_train(settings, params.experts)
    ticks = ctx.steps(missing * settings.epochs, "experts") if missing else iter(())

    def tick() -> None:
        next(ticks, None)

    start = time.perf_counter()
    buffer = ensure_buffer(ctx.dataset, ctx.train, settings, params.experts, ctx.device, log=ctx.log, tick=tick,
                           check_cancelled=ctx.check_cancelled)
    for _ in ticks:  # close the progress stage
        pass
    if missing:  # the whole training, not only from the first finished epoch as the progress stage measures
        ctx.timings["experts"] = time.perf_counter() - start
    return buffer


def check_common(params: TrajectoryParams, resolved: dict[str, Any], buffer_epochs: int, log) -> int:
    """Validate and return the usable max_start_epoch (the reference needs max_start + M <= epochs)."""
    if params.zca:
        raise DistillError("zca=true is not supported: distill evaluation trains on mean/std-normalised pixels")
    expert_epochs = resolved["expert_epochs"]
    if expert_epochs > buffer_epochs:
        raise DistillError(f"expert_epochs {expert_epochs} exceeds the buffer's {buffer_epochs} epochs "
                           f"(set expert_train_epochs >= {expert_epochs})")
    max_start = min(resolved["max_start_epoch"], buffer_epochs - expert_epochs + 1)
    if max_start < resolved["max_start_epoch"]:
        log(f"max_start_epoch {resolved['max_start_epoch']} clamped to {max_start} "
            f"(buffer has {buffer_epochs} epochs, expert_epochs {expert_epochs})")
    return max_start


def init_real(ctx: RunContext, generator_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ipc random real images per class (pixel scale) and their labels."""
    rng = np.random.default_rng(generator_seed)
    images, labels = [], []
    for c in range(ctx.num_classes):
        images.append(ctx.class_images(c, limit=ctx.ipc, rng=rng))
        labels.append(torch.full((ctx.ipc,), c, dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


class SyntheticOptimizer:
    """The reference's SGD(momentum 0.5) on pixels and on syn_lr, fed with externally computed gradients."""

    def __init__(self, tensors_lrs: list[tuple[torch.Tensor, float, float]]):
        self.groups = [torch.optim.SGD([t], lr=lr, momentum=m) for t, lr, m in tensors_lrs]
        self.tensors = [t for t, _, _ in tensors_lrs]

    def step(self, grads: list[torch.Tensor | None]) -> None:
        for opt, tensor, grad in zip(self.groups, self.tensors, grads, strict=True):
            if grad is None:
                continue
            tensor.grad = grad.reshape(tensor.shape).detach().clone()
            opt.step()
            tensor.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"groups": [opt.state_dict() for opt in self.groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for opt, saved in zip(self.groups, state["groups"], strict=True):
            opt.load_state_dict(saved)


def usable_lr(learned: float, log: Callable[[str], None]) -> float | None:
    """The learned student lr the archive keeps for evaluation: None when it is not a positive finite number
    (the reference lets ``syn_lr`` cross zero; students then train at the protocol's lr; the manifest keeps
    the raw value)."""
    if usable_learned_lr(learned):
        return learned
    log(f"learned student lr {learned:.5g} is not positive: the archive stores none (evaluation uses its default)")
    return None


def loss_summary(history: list[float]) -> dict[str, float]:
    if not history:
        return {}
    k = max(1, min(10, len(history) // 5 or 1))
    return {"loss_first": round(float(np.mean(history[:k])), 5), "loss_last": round(float(np.mean(history[-k:])), 5),
            "loss_min": round(float(np.min(history)), 5), "iterations_run": len(history)}


# ------------------------------------------------------------------------------------------------ method
class TrajectoryMatching(Method[MTTParams]):
    name: ClassVar[str] = "mtt"
    summary: ClassVar[str] = "Match student trajectories on synthetic data to expert trajectories (Cazenavette 2022)"
    family: ClassVar[str] = "pixel"
    Params = MTTParams

    def run(self, ctx: RunContext, params: MTTParams) -> DistilledSet:
        if params.zca:
            raise DistillError("zca=true is not supported: distill evaluation trains on mean/std-normalised pixels")
        resolved = resolve(params, MTT_TABLE, MTT_DEFAULTS, ctx.dataset.name, ctx.ipc)
        buffer = get_buffer(ctx, params)
        max_start = check_common(params, resolved, buffer.epochs, ctx.log)
        device = ctx.device
        net = buffer.build_net(ctx.dataset).to(device)
        model = FlatModel(net)
        strategy = dsa_strategy(params, ctx.dataset.digits)
        dtype = student_dtype(params.student_precision, device)
        generator = ctx.generator(17)
        rng = np.random.default_rng(ctx.seed + 23)

        pixels, labels = init_real(ctx, ctx.seed)
        if params.pix_init == "noise":
            images = torch.randn(pixels.shape, generator=generator)
        else:
            images = ctx.normalize(pixels)
        images = images.to(device).requires_grad_(True)  # optimised in normalised space, as the reference
        labels = labels.to(device)
        syn_lr = torch.tensor(float(resolved["lr_teacher"]), device=device).requires_grad_(True)
        optimizer = SyntheticOptimizer([(images, resolved["lr_img"], IMG_MOMENTUM), (syn_lr, resolved["lr_lr"], IMG_MOMENTUM)])
        batch_syn = resolved["batch_syn"] or len(images)
        syn_steps = resolved["syn_steps"]

        history: list[float] = []
        expert_order: list[int] = []
        iter_seconds: list[float] = []
        state = LoopState({"images": images, "syn_lr": syn_lr}, {"synthetic": optimizer}, generator, history,
                          numpy_rng=rng, lists={"expert_order": expert_order})
        for it in ctx.resumable_steps(params.iterations, "distill", state, ctx.run_key(self.name, params)):
            t0 = time.perf_counter()
            if not expert_order:
                expert_order.extend(int(e) for e in rng.permutation(buffer.num_experts))
            expert = int(expert_order.pop())
            start_epoch = int(rng.integers(0, max_start))
            start = buffer.snapshot(expert, start_epoch).to(device)
            target = buffer.snapshot(expert, start_epoch + resolved["expert_epochs"]).to(device)
            plan = make_plan(len(images), syn_steps, batch_syn, generator)
            step_loss = make_step_loss(model, images, labels, plan, strategy, dtype=dtype)
            result = match_trajectory(step_loss, start, target, syn_lr, [images], syn_steps, params.memory_efficient)
            if not math.isfinite(result.loss):
                raise DistillError(f"MTT loss became {result.loss} at iteration {it}: lower lr_img or lr_lr")
            optimizer.step([result.grads[0], result.grad_lr])
            history.append(result.loss)
            iter_seconds.append(time.perf_counter() - t0)
            if it % 10 == 0:
                ctx.log(f"mtt it {it}: loss {result.loss:.4f} syn_lr {float(syn_lr.detach()):.5f}")

        out = ctx.dataset.denormalize(images.detach().cpu())
        return DistilledSet(
            images=out,
            labels=labels.cpu(),
            learned_lr=usable_lr(float(syn_lr.detach()), ctx.log),
            metrics={
                "resolved": resolved | {"max_start_epoch_used": max_start, "batch_syn_used": batch_syn},
                "buffer": buffer.folder.name,
                "experts_in_buffer": buffer.num_experts,
                "learned_lr": float(syn_lr.detach()),
                "seconds_per_iteration": round(float(np.median(iter_seconds)), 4) if iter_seconds else None,
                **loss_summary(history),
            },
            extras={"loss_curve": torch.tensor(history)},
        )
