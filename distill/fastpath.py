"""The fast path of training and testing a network: bf16 autocast, channels_last and torch.compile as switches.

Training fresh students dominates the cost of evaluation, teachers and refinement, so each switch is here once
and every caller asks for it by setting. ``precision='fp32'`` with compile and channels_last off is the
reference-exact path: the model is handed back untouched and :meth:`FastPath.logits` is a plain ``model(x)``,
so training through it is bit-identical to eager training. Which switch pays depends on the CPU or GPU at hand
(measure with ``bench/train_speed.py``): bf16 only where the hardware runs it natively ('auto'),
channels_last by default on CUDA and, on CPUs, for bf16 batch-norm networks (it slows the instance-norm ConvNet
down), torch.compile only for runs long enough to repay its one-time compilation ('auto').
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from distill.errors import DistillError
from distill.precision import autocast_context, precision_dtype

SWITCHES = ("auto", "on", "off")
# torch.compile pays back its one-time compilation only over enough work: 'auto' compiles a run that pushes at
# least this many image-pixels (steps x images per step x side^2) through the network (bench/train_speed.py
# measures where compilation pays back on the host at hand).
COMPILE_MIN_WORK = 50_000_000
# Every network of one class shares one forward, so one evaluation's teacher, students, control and test passes
# compile their shapes (batch and last partial batch, train and no-grad) as variants of one function: a soft-label
# evaluation needs more than torch's default of 8, past which new variants run eager.
COMPILE_VARIANTS = 32


@dataclass
class FastPath:
    """A network prepared for one precision / memory layout / compile setting, and how to call it.

    ``model`` is the original module (its parameters are what an optimiser updates and what a state dict
    holds); ``eager`` runs a batch uncompiled (the model, or under data parallelism its
    DistributedDataParallel wrapper); ``call`` is what runs a batch (``eager`` compiled, or ``eager``)."""

    model: nn.Module
    device: torch.device
    dtype: torch.dtype | None = None  # autocast dtype; None: fp32
    channels_last: bool = False
    compiled: bool = False
    call: Callable[[torch.Tensor], torch.Tensor] = field(init=False)
    eager: nn.Module = field(init=False, repr=False)
    log: Callable[[str], None] = field(default=lambda message: None, repr=False)

    def __post_init__(self) -> None:
        self.eager = self.model
        self.call = self.model

    @property
    def data_parallel(self) -> bool:
        """True when batches run through a DistributedDataParallel wrapper (several processes)."""
        return self.eager is not self.model

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Within it, backward passes accumulate gradients locally (DDP's ``no_sync``: every micro-batch of a
        step but the last); a no-op in one process."""
        if self.data_parallel:
            return self.eager.no_sync()  # type: ignore[operator]  # DistributedDataParallel.no_sync
        return contextlib.nullcontext()

    def idle_loss(self, image_shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """A zero loss from the network run on an empty batch of ``image_shape`` images (eager, not compiled):
        the backward of a process with no images in a step, which still takes part in DDP's gradient reduction
        (and SyncBatchNorm's statistics) and adds nothing to either."""
        x = self.input(torch.zeros((0, *image_shape), device=self.device))
        with self.autocast():
            return self.eager(x).float().sum() * 0.0

    @property
    def reference_exact(self) -> bool:
        """True when nothing differs from plain eager fp32 on a contiguous NCHW model."""
        return self.dtype is None and not self.channels_last and not self.compiled

    def autocast(self) -> contextlib.AbstractContextManager:
        """A fresh autocast context for this path (a no-op for fp32)."""
        return autocast_context(self.device, self.dtype)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory layout the model was prepared for. Off the reference-exact path a batch in another
        layout is brought to it (DSA's crop hands back channels-last strides): eager bf16 runs such a batch about
        2x slower through the group-norm ConvNet on a CPU, and a compiled network compiles a variant for it."""
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x if self.reference_exact else contiguous_nchw(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits of a batch under this path's autocast (losses are taken in fp32)."""
        x = self.input(x)
        with self.autocast():
            try:
                out = self.call(x)
            except Exception as exc:  # any compiler failure: the eager module is the same math
                if not self.compiled or self.call is self.eager:
                    raise
                self.log(f"torch.compile of the network failed ({type(exc).__name__}: {exc}); running eager")
                self.call, self.compiled = self.eager, False
                out = self.eager(x)
        return out.float()


def contiguous_nchw(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the strides of a plain contiguous tensor, size-1 dimensions included (``contiguous()`` leaves a
    one-channel batch's channel stride as it was, and a compiled network specialises to every stride)."""
    x = x.contiguous()
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.append(step)
        step *= size
    strides.reverse()
    return x if list(x.stride()) == strides else x.as_strided(x.shape, strides)


def resolve_switch(setting: str | bool, name: str) -> str:
    if isinstance(setting, bool):
        return "on" if setting else "off"
    if setting not in SWITCHES:
        raise DistillError(f"unknown {name} '{setting}' (use {', '.join(SWITCHES)})")
    return setting


def raise_recompile_limit() -> None:
    """Let one forward hold :data:`COMPILE_VARIANTS` compiled variants (never lowers a higher setting)."""
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, COMPILE_VARIANTS)


def run_work(steps: int, images_per_step: int, image_size: int) -> int:
    """The work of a run as compile 'auto' weighs it: image-pixels through the network."""
    return steps * images_per_step * image_size * image_size


def compile_wanted(setting: str | bool, device: torch.device, work: int | None,
                   model: nn.Module | None = None) -> bool:
    """'on' / 'off', or 'auto': on CPU and CUDA for runs of at least :data:`COMPILE_MIN_WORK` (:func:`run_work`);
    on a CPU not for batch-norm networks (``model``), whose bf16 oneDNN kernels leave compilation nothing to fuse
    that pays back (bench/train_speed.py, ResNet-18 rows); the group-norm ConvNet gains most from it."""
    setting = resolve_switch(setting, "compile")
    if setting == "auto":
        if device.type == "cpu" and model is not None and any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            return False
        return device.type in ("cpu", "cuda") and work is not None and work >= COMPILE_MIN_WORK
    return setting == "on"


def channels_last_wanted(setting: str | bool, device: torch.device, model: nn.Module | None = None,
                         dtype: torch.dtype | None = None) -> bool:
    """'on' / 'off', or 'auto': on CUDA; on a CPU only for bf16 networks without group / layer norm (the CPU's
    group norm is slow in channels_last, so the instance-norm ConvNet trains slower; batch-norm ResNet-18 faster)."""
    setting = resolve_switch(setting, "channels_last")
    if setting == "auto":
        if device.type == "cuda":
            return True
        slow_norms = (nn.GroupNorm, nn.LayerNorm)
        return (device.type == "cpu" and dtype is not None and model is not None
                and not any(isinstance(m, slow_norms) for m in model.modules()))
    return setting == "on"


def prepare(
    model: nn.Module,
    device: torch.device,
    precision: str = "fp32",
    compile: str | bool = "off",
    channels_last: str | bool = "off",
    *,
    work: int | None = None,
    log: Callable[[str], None] | None = None,
    data_parallel: bool = False,
) -> FastPath:
    """``model`` (already on ``device``) prepared for a precision ('auto' | 'fp32' | 'bf16'), a compile setting
    and a memory-layout setting ('auto' | 'on' | 'off' or a bool); ``work`` (:func:`run_work` of the run) lets
    compile 'auto' decide whether compilation pays. 'fp32', 'off', 'off' returns the model untouched.

    ``data_parallel`` (several processes): batches run through the model's DistributedDataParallel wrapper
    (:func:`distill.training.wrap_data_parallel`; compiled when compile is on), its parameters stay the model's."""
    dtype = precision_dtype(precision, device, "--precision")
    layout = channels_last_wanted(channels_last, device, model, dtype)
    fast = FastPath(model, device, dtype, layout, log=log or (lambda m: None))
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # a documented overload
    if data_parallel:
        from distill.training import wrap_data_parallel

        fast.eager = fast.call = wrap_data_parallel(model, device)
    if compile_wanted(compile, device, work):
        raise_recompile_limit()
        fast.call = torch.compile(fast.eager, dynamic=False)
        fast.compiled = True
    return fast


def train_step(fast: FastPath, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One plain optimiser step of mean cross-entropy on (x, y); the loss value, for logs and tests."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(fast.logits(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
