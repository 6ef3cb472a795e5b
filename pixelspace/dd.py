"""DD: Dataset Distillation (Wang, Zhu, Torralba & Efros, 2018), repo SsnL/dataset-distillation.

Bi-level optimisation as ``train_distilled_image.py`` (mode distill_basic, train_nets_type unknown_init):
every iteration re-initialises the network, unrolls T = distill_steps x distill_epochs plain SGD steps on
the distilled batches (steps repeat 1..S, 1..S, ...), each with its own learned learning rate (softplus of
a raw parameter initialised at the inverse softplus of distill_lr), evaluates CE on a real batch with the
final weights and back-propagates through the unrolled steps into the images and the step lrs (autograd
with a second-order graph; the reference writes the same Hessian-vector products by hand).
Outer optimiser: Adam(lr 0.01, betas (0.5, 0.999)) with StepLR(gamma 0.5 every decay_epochs = 40 epochs of the
real loader, of 400). Reference facts: docs/METHODS.md §1.

IPC mapping: the reference's "ipc" is images per class *per step* (default 1 image x 10 steps = 100
images, the "10 ipc" setting). Here ``ipc`` is the total per class, as for every method: the set is cut
into ``distill_steps`` batches (default the largest divisor of ipc that is <= 10) of ipc / distill_steps
images per class each. IPC 1 -> 1 step x 3 epochs; IPC 10 -> the reference's 10 steps x 1 image.

Evaluation: the archive's ``learned_lr`` is the mean of the T learned step lrs (``distill eval`` trains
with it); all T lrs are in ``extras['step_lrs']`` and each image's step index in ``extras['dd_step']``,
which ``distill eval --protocol dd`` replays on fresh networks (DD's own evaluation; use the run's ``model``,
e.g. ``--model lenet`` for DD's MNIST network).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch.func import functional_call
from torch.nn import functional as F

from distill.errors import DistillError
from distill.methods.base import DistilledSet, Method, MethodParams, NetworkName, RunContext
from pixelspace.realpool import RealPool
from pixelspace.synthetic import LoopState, init_synthetic, network_iterations, to_pixel


class DDParams(MethodParams):
    iterations: int | None = Field(
        None, ge=1, description="Outer steps (one real batch each); None = epochs x ceil(train size / batch_real).")
    epochs: int = Field(400, ge=1, description="Reference --epochs: passes over the real data (used when iterations is None).")
    distill_steps: int | None = Field(
        None, ge=1, description="Distinct distilled batches; None = largest divisor of ipc <= 10 (must divide ipc).")
    distill_epochs: int = Field(3, ge=1, description="Times the distilled batches are replayed; T = steps x epochs.")
    distill_lr: float | None = Field(
        None, gt=0, description="Initial per-step lr; None = 0.02 (reference default, MNIST) or 0.001 for colour data (README).")
    lr: float = Field(0.01, gt=0, description="Adam learning rate of the images and step lrs (betas 0.5, 0.999).")
    decay_epochs: int = Field(
        40, ge=1, description="StepLR period in epochs over the real data (an epoch = ceil(train size / batch_real) "
                              "iterations, as the reference steps its scheduler once per epoch).")
    decay_factor: float = Field(0.5, gt=0, le=1, description="StepLR gamma.")
    batch_real: int = Field(1024, ge=1, description="Real images per outer step (reference --batch_size).")
    init: Literal["noise", "real"] = Field("noise", description="Distilled image initialisation (reference: randn).")
    model: NetworkName = Field("convnet", description="Network unrolled on (distill.nets name); re-initialised every iteration.")
    lr_summary: Literal["mean", "final"] = Field(
        "mean", description="Which learned lr the archive's learned_lr holds: mean over the T steps, or the last step's.")


def inverse_softplus(value: float) -> float:
    return math.log(math.expm1(value))


def default_steps(ipc: int) -> int:
    return max(d for d in range(1, min(10, ipc) + 1) if ipc % d == 0)


def unrolled_loss(
    net: torch.nn.Module,
    batches: list[torch.Tensor],
    batch_labels: list[torch.Tensor],
    raw_lrs: torch.Tensor,
    real_x: torch.Tensor,
    real_y: torch.Tensor,
    distill_epochs: int,
) -> torch.Tensor:
    """CE on the real batch after T unrolled SGD steps from the network's current weights."""
    weights = {k: v.detach().requires_grad_(True) for k, v in net.named_parameters()}
    buffers = dict(net.named_buffers())
    lrs = F.softplus(raw_lrs)
    steps = len(batches)
    t = 0
    for _ in range(distill_epochs):
        for s in range(steps):
            out = functional_call(net, (weights, buffers), (batches[s],))
            loss = F.cross_entropy(out, batch_labels[s])
            grads = torch.autograd.grad(loss, list(weights.values()), create_graph=True)
            weights = {k: w - lrs[t] * g for (k, w), g in zip(weights.items(), grads, strict=True)}
            t += 1
    return F.cross_entropy(functional_call(net, (weights, buffers), (real_x,)), real_y)


class DatasetDistillation(Method[DDParams]):
    name: ClassVar[str] = "dd"
    summary: ClassVar[str] = "Dataset Distillation: unrolled SGD on synthetic images with learned per-step lrs (2018)."
    family: ClassVar[str] = "pixel"
    Params = DDParams

    def run(self, ctx: RunContext, params: DDParams) -> DistilledSet:
        ds = ctx.dataset
        ipc = ctx.ipc
        steps = params.distill_steps or default_steps(ipc)
        if ipc % steps:
            raise DistillError(f"distill_steps {steps} must divide ipc {ipc}")
        per_step = ipc // steps
        total = params.distill_epochs * steps
        iterations_per_epoch = math.ceil(len(ctx.train) / params.batch_real)
        iterations = params.iterations or params.epochs * iterations_per_epoch
        # The reference halves the lr every decay_epochs epochs of the real loader, whatever the budget; a short
        # budget (iterations=N) stops early in that schedule instead of squeezing all its decays into N steps.
        decay_every = params.decay_epochs * iterations_per_epoch
        distill_lr = params.distill_lr or (0.02 if ds.channels == 1 else 0.001)
        generator = ctx.generator(17)
        pool = RealPool(ctx)
        images, labels = init_synthetic(ctx, pool, params.init, generator)
        # class-major (c0: step 0..S-1 x per_step, c1: ...) -> step s holds per_step images of every class
        step_of_image = torch.arange(ipc, device=ctx.device).div(per_step, rounding_mode="floor").repeat(ds.num_classes)
        images.requires_grad_(True)
        raw_lrs = torch.full((total,), inverse_softplus(distill_lr), device=ctx.device, requires_grad=True)
        optimizer = torch.optim.Adam([images, raw_lrs], lr=params.lr, betas=(0.5, 0.999))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=decay_every, gamma=params.decay_factor)
        masks = [(step_of_image == s).nonzero().squeeze(1) for s in range(steps)]
        losses: list[float] = []
        state = LoopState({"images": images, "raw_lrs": raw_lrs}, {"adam": optimizer, "step_lr": scheduler}, generator,
                          losses)
        for it, net in network_iterations(ctx, self.name, params, iterations, params.model, state):
            real_x, real_y = pool.sample_mixed(params.batch_real, generator)
            loss = unrolled_loss(net, [images[m] for m in masks], [labels[m] for m in masks], raw_lrs, real_x, real_y,
                                 params.distill_epochs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if it % 50 == 0:
                ctx.log(f"dd iteration {it}: loss {losses[-1]:.4f}")
        step_lrs = F.softplus(raw_lrs.detach()).cpu()
        learned = float(step_lrs.mean()) if params.lr_summary == "mean" else float(step_lrs[-1])
        return DistilledSet(
            images=to_pixel(ctx, images),
            labels=labels.cpu(),
            learned_lr=learned,
            extras={"step_lrs": step_lrs, "dd_step": step_of_image.cpu(), "loss_curve": torch.tensor(losses)},
            metrics={
                "final_loss": losses[-1] if losses else None,
                "first_loss": losses[0] if losses else None,
                "model": params.model,  # protocol dd replays the learned steps on this network
                "distill_steps": steps,
                "distill_epochs": params.distill_epochs,
                "images_per_class_per_step": per_step,
                "iterations": iterations,
                "learned_lr_mean": float(step_lrs.mean()),
                "learned_lr_final": float(step_lrs[-1]),
                "lr_final": optimizer.param_groups[0]["lr"],
                "space": "normalised during optimisation, pixel scale in the archive",
            },
        )
