"""The synthetic side of the pixel-space methods: initialisation, the image optimiser, fresh networks, output.

Synthetic images live in *normalised* space during optimisation, as in the references; :func:`to_pixel`
converts them back only when a method hands its :class:`DistilledSet` out.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from distill.augment import strategy_for
from distill.errors import DistillError
from distill.methods.base import DistilledSet, MethodParams, RunContext
from distill.nets import build_network
from pixelspace.precision import arithmetic_name, real_autocast_dtype
from pixelspace.realpool import RealPool


def draw_seed(generator: torch.Generator) -> int:
    """A seed for one Siamese DSA call (the reference uses the wall clock; we stay reproducible)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def resolve_strategy(strategy: str, digits: bool) -> str:
    """'auto' -> the dataset's recommended DSA strategy (no flip for digits); 'none' disables."""
    if strategy == "auto":
        return strategy_for(digits)
    return strategy


def init_synthetic(
    ctx: RunContext, pool: RealPool | None, init: str, generator: torch.Generator, ipc: int | None = None,
    initial: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-ordered synthetic images (normalised space) and their hard labels.

    'noise': standard normal in normalised space (DC/DD ``torch.randn``); 'real': random real images of
    each class (DC/DSA/DM ``--init real``), drawn exactly as the ``random`` baseline draws them for ctx.seed.
    ``initial`` (class-ordered [0, 1] pixels, IPC per class, e.g. another method's set to refine) replaces both.
    """
    ipc = ipc or ctx.ipc
    ds = ctx.dataset
    shape = (ds.num_classes * ipc, ds.channels, ds.image_size, ds.image_size)
    labels = torch.arange(ds.num_classes, device=ctx.device).repeat_interleave(ipc)
    if initial is not None:
        if len(initial) != len(labels):
            raise DistillError(f"a set to refine needs {ipc} images per class, class-ordered; got {len(initial)}")
        images = ctx.normalize(initial.float().to(ctx.device))
    elif init == "noise":
        images = torch.randn(shape, generator=generator).to(ctx.device)
    elif init == "real":
        if pool is None:
            raise DistillError("init 'real' needs real images")
        # The same draw as the `random` baseline for this seed (numpy default_rng(seed), classes in order),
        # so a method's gain over `random` is what distillation added to those very images.
        rng = np.random.default_rng(ctx.seed)
        picks = []
        for c in range(ds.num_classes):
            if pool.count(c) < ipc:
                raise DistillError(f"init 'real' needs {ipc} images of class {c}; it has {pool.count(c)}")
            picks.append(pool._normalise(pool.images(c, np.sort(rng.choice(pool.count(c), size=ipc, replace=False)))))
        images = torch.cat(picks)
    else:
        raise DistillError(f"unknown init '{init}' (use 'noise' or 'real')")
    return images.contiguous(), labels


def learnable_images(
    ctx: RunContext, pool: RealPool | None, init: str, generator: torch.Generator, lr: float,
    initial: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.optim.SGD]:
    """:func:`init_synthetic` images made learnable, their hard labels and the references' image optimiser."""
    image_syn, label_syn = init_synthetic(ctx, pool, init, generator, initial=initial)
    image_syn.requires_grad_(True)
    return image_syn, label_syn, image_optimizer(image_syn, lr)


def to_pixel(ctx: RunContext, images: torch.Tensor) -> torch.Tensor:
    """Normalised images -> pixel scale (not clamped: evaluation must see exactly what was learned)."""
    return ctx.dataset.denormalize(images.detach()).cpu()


def image_optimizer(images: torch.Tensor, lr: float, momentum: float = 0.5) -> torch.optim.SGD:
    """The references' image optimiser: SGD with momentum 0.5 on the synthetic images."""
    return torch.optim.SGD([images], lr=lr, momentum=momentum)


def fresh_network(model: str, ctx: RunContext, seed: int) -> nn.Module:
    """A newly initialised network (the references sample one per iteration)."""
    ds = ctx.dataset
    return build_network(model, ds.channels, ds.num_classes, ds.image_size, seed=seed).to(ctx.device)


def has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


class LoopState:
    """Everything a pixel method's loop carries from one iteration to the next, as one checkpointable state.

    ``tensors`` (learnable images, step lrs ...) are restored in place, so optimisers keep pointing at them;
    ``optimizers`` holds anything with ``state_dict``/``load_state_dict`` (optimisers, lr schedulers); the
    sampling generator, torch's global RNG and the loss curve come along, which makes a resumed run continue
    exactly where the saved one stopped (:meth:`RunContext.resumable_steps`).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], optimizers: dict[str, Any], generator: torch.Generator,
                 losses: list[float], numpy_rng: np.random.Generator | None = None,
                 lists: dict[str, list[Any]] | None = None):
        self.tensors, self.optimizers, self.generator, self.losses = tensors, optimizers, generator, losses
        # Trajectory methods also draw experts and start epochs from a numpy generator and keep queues/counters.
        self.numpy_rng, self.lists = numpy_rng, lists or {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "tensors": {k: v.detach().cpu().clone() for k, v in self.tensors.items()},
            "optimizers": {k: copy.deepcopy(o.state_dict()) for k, o in self.optimizers.items()},
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "losses": list(self.losses),
            "numpy_rng": copy.deepcopy(self.numpy_rng.bit_generator.state) if self.numpy_rng is not None else None,
            "lists": {k: list(v) for k, v in self.lists.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in self.tensors.items():
                v.copy_(state["tensors"][k].to(v.device))
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.losses[:] = state["losses"]
        if self.numpy_rng is not None:
            self.numpy_rng.bit_generator.state = state["numpy_rng"]
        for name, items in self.lists.items():
            items[:] = state["lists"][name]


def network_iterations(ctx: RunContext, method: str, params: MethodParams, iterations: int, model: str,
                       state: LoopState, stage: str = "distill") -> Iterator[tuple[int, nn.Module]]:
    """The outer loop of an image-optimising method: resumable (``state`` is checkpointed), and every iteration
    on a freshly initialised network in train mode, seeded by the iteration as the references sample one.
    ``stage`` names the loop in progress reports, timings and its checkpoint."""
    for it in ctx.resumable_steps(iterations, stage, state, ctx.run_key(method, params)):
        net = fresh_network(model, ctx, seed=ctx.seed * 1_000_003 + it)
        net.train()
        yield it, net


class MatchingParams(Protocol):
    """The parameters DC, DSA and DM share (read-only here, so each method's own Literal types fit)."""

    @property
    def init(self) -> str: ...

    @property
    def dsa_strategy(self) -> str: ...

    @property
    def real_precision(self) -> str: ...


@dataclass
class MatchingSetup:
    """What DC, DSA and DM hold from their set-up (:func:`matching_setup`) to their result."""

    strategy: str
    generator: torch.Generator
    real_dtype: torch.dtype | None
    pool: RealPool
    image_syn: torch.Tensor
    label_syn: torch.Tensor
    optimizer_img: torch.optim.SGD
    losses: list[float]
    state: LoopState

    def result(self, ctx: RunContext, **metrics) -> DistilledSet:
        """The DistilledSet every image-optimising method returns: pixel-scale images, loss curve, common metrics."""
        losses = self.losses
        return DistilledSet(
            images=to_pixel(ctx, self.image_syn),
            labels=self.label_syn.cpu(),
            extras={"loss_curve": torch.tensor(losses)},
            metrics={
                "final_loss": losses[-1] if losses else None,
                "first_loss": losses[0] if losses else None,
                **metrics,
                "dsa_strategy": self.strategy,
                "real_precision": arithmetic_name(self.real_dtype),
                "space": "normalised during optimisation, pixel scale in the archive",
            },
        )


def matching_setup(ctx: RunContext, params: MatchingParams, stream: int, lr_img: float,
                   initial: torch.Tensor | None = None) -> MatchingSetup:
    """The common start of DC, DSA and DM: DSA strategy, the sampling generator of ``stream``, real-side dtype,
    real pool, learnable images with their optimiser, and the checkpointable loop state over them."""
    strategy = resolve_strategy(params.dsa_strategy, ctx.dataset.digits)
    generator = ctx.generator(stream)
    real_dtype = real_autocast_dtype(params.real_precision, ctx.device)
    pool = RealPool(ctx)
    image_syn, label_syn, optimizer_img = learnable_images(ctx, pool, params.init, generator, lr_img, initial)
    losses: list[float] = []
    state = LoopState({"images": image_syn}, {"images": optimizer_img}, generator, losses)
    return MatchingSetup(strategy, generator, real_dtype, pool, image_syn, label_syn, optimizer_img, losses, state)
