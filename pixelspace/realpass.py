"""A network pass (the real side's, or DM's synthetic side's) as a pure function of a parameter dict, optionally
through torch.compile.

Methods sample a fresh network every iteration; compiling a function of (parameters, batch) of one template
network compiles once per run instead of once per network.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from distill.errors import Cancelled, DistillError
from distill.fastpath import raise_recompile_limit
from distill.methods.base import CHECK_SECONDS
from distill.nets import Classifier
from pixelspace.precision import autocast_context

COMPILE_REAL_HELP = (
    "torch.compile the real side's network pass (fuses norm, ReLU and pooling around the convolutions; measured "
    "1.4-1.6x on that pass on CPU, fp32 and bf16 alike). Costs about 25 s of compilation once per run, so 'auto' "
    "turns it on (CPU and CUDA) only for runs of at least 50 iterations; 'on' / 'off' force it. Falls back to eager, "
    "with a log line, when the host cannot compile (no C++ compiler).")
COMPILE_MIN_ITERATIONS = 50


def compile_wanted(setting: str, device: torch.device, iterations: int) -> bool:
    """Whether to compile the real pass: 'on', 'off', or 'auto' (CPU or CUDA, and long enough to pay back)."""
    if setting == "auto":
        return device.type in ("cpu", "cuda") and iterations >= COMPILE_MIN_ITERATIONS
    if setting in ("on", "off"):
        return setting == "on"
    raise DistillError(f"unknown compile_real '{setting}' (use auto, on or off)")


class RealPass:
    """A pure function of (parameter dict, batch ...) of one architecture, optionally through torch.compile.

    Methods sample a fresh network every iteration; the function closes over one *template* network of the
    run's architecture and receives each iteration's parameter values as inputs, so it compiles once per
    run, not per network. If compilation fails, the pass runs eager from then on (logged once).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], compile: bool, log: Callable[[str], None] | None = None,
                 check_cancelled: Callable[[], None] | None = None):
        self.fn = fn
        self.log = log or (lambda message: None)
        self.check_cancelled = check_cancelled
        # With a cancellation check, even torch.compile's set-up (importing the compiler takes seconds) waits
        # for the first call and runs inside the cancellable warm-up.
        self.pending = compile and check_cancelled is not None
        if compile:
            raise_recompile_limit()  # the real and synthetic passes of a run are variants of one function
        self.compiled: Callable[..., torch.Tensor] | None = (
            torch.compile(fn, dynamic=False) if compile and not self.pending else None)

    def __call__(self, *args: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        if self.pending:
            try:
                out = self._warm_up(*args)
                self.pending = False
                return out
            except Cancelled:
                raise
            except Exception as exc:
                self.pending = False
                self.log(f"torch.compile of the real pass failed ({type(exc).__name__}: {exc}); running eager")
                self.compiled = None
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # any compiler failure: the eager function is the same math
                self.log(f"torch.compile of the real pass failed ({type(exc).__name__}: {exc}); running eager")
                self.compiled = None
        return self.fn(*args)

    def _warm_up(self, *args: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        """Compile and make the first compiled call (seconds to tens of seconds, uninterruptible) in a helper
        thread while this one checks for cancellation every ``CHECK_SECONDS``: a cancel is honoured during the
        warm-up too. A cancelled warm-up finishes in the background and is discarded. The thread takes this
        one's grad mode (thread-local), so the graph it compiles is the one later calls use."""
        assert self.check_cancelled is not None
        fn, grad = self.fn, torch.is_grad_enabled()
        result: dict[str, Any] = {}

        def warm_up() -> None:
            try:
                compiled = torch.compile(fn, dynamic=False)
                with torch.set_grad_enabled(grad):
                    result["out"] = compiled(*args)
                result["compiled"] = compiled
            except BaseException as exc:  # handed to the caller, which falls back to eager
                result["error"] = exc

        thread = threading.Thread(target=warm_up, name="realpass-compile", daemon=True)
        thread.start()
        while thread.is_alive():
            self.check_cancelled()
            thread.join(CHECK_SECONDS)
        if "error" in result:
            raise result["error"]
        self.compiled = result["compiled"]
        return result["out"]


def network_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """Detached parameters and buffers by name: the inputs a :class:`RealPass` takes for ``net``."""
    return {**{k: v.detach() for k, v in net.named_parameters()}, **dict(net.named_buffers())}


def real_ce_pass(template: nn.Module, autocast_dtype: torch.dtype | None) -> Callable[..., torch.Tensor]:
    """(state dict, images, labels) -> mean CE of ``template``'s architecture with those values."""

    def ce(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast_context(x.device, autocast_dtype):
            out = functional_call(template, state, (x,))
        return F.cross_entropy(out.float(), y)

    return ce


class _Embedding(nn.Module):
    """``net.embed`` as a module's forward, so functional_call can run it with other parameter values."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x) if isinstance(self.net, Classifier) else self.net(x)


def real_embed_pass(template: nn.Module, autocast_dtype: torch.dtype | None) -> Callable[..., torch.Tensor]:
    """(state dict, images) -> fp32 embeddings of ``template``'s architecture with those values."""
    wrapper = _Embedding(template)

    def embed(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with autocast_context(x.device, autocast_dtype):
            out = functional_call(wrapper, {f"net.{k}": v for k, v in state.items()}, (x,))
        return out.float()

    return embed
