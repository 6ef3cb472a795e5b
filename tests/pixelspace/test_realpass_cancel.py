"""A cancel during torch.compile's warm-up (the first compiled call of the real pass, an uninterruptible call of
many seconds) is honoured within the usual check interval; a warm-up that is not cancelled gives the same result
as eager and later calls reuse it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from distill.errors import Cancelled
from pixelspace.realpass import RealPass


@pytest.fixture(autouse=True)
def finished_warm_ups() -> Iterator[None]:
    """A cancelled warm-up keeps compiling in its thread: let it end before the next test (and before the
    interpreter exits under a compiler thread)."""
    yield
    for thread in threading.enumerate():
        if thread.name == "realpass-compile":
            thread.join(timeout=300)


def projection(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x @ state["w"] + state["b"]).square().sum(1)


def inputs(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g)}, torch.randn(32, 16, generator=g)


def test_cancel_during_the_compile_warm_up_is_noticed_at_once() -> None:
    start = time.monotonic()  # the compiler's set-up (imports) is part of the warm-up

    def check() -> None:  # the cancel arrives shortly after the warm-up began
        if time.monotonic() - start > 0.2:
            raise Cancelled("job cancelled")

    def slow_projection(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        # the warm-up outlasts the cancel even when the compiler's caches make compiling itself fast
        time.sleep(3.0)  # a graph break: runs eagerly inside the first compiled call
        return projection(s, x) + 1.0

    real = RealPass(slow_projection, compile=True, check_cancelled=check)
    state, x = inputs(0)
    with pytest.raises(Cancelled):
        real(state, x)
    assert time.monotonic() - start < 2.0  # compiling takes far longer; the cancel did not wait for it


def test_an_uncancelled_warm_up_matches_eager_and_is_reused() -> None:
    real = RealPass(projection, compile=True, check_cancelled=lambda: None)
    state, x = inputs(1)
    with torch.no_grad():  # the real side runs graph-free: the helper thread must compile that graph
        first = real(state, x)
        again = real(*inputs(2))
    if real.compiled is None:
        pytest.skip("torch.compile is not available on this host (it fell back to eager)")
    assert not real.pending and not first.requires_grad
    torch.testing.assert_close(first, projection(state, x))
    torch.testing.assert_close(again, projection(*inputs(2)))


def test_dm_cancelled_while_it_compiles_stops_within_two_seconds(mnist) -> None:
    from distill.methods.base import RunContext
    from distill.methods.registry import get_method, parse_params

    dm = get_method("dm")
    params = parse_params(dm, {"iterations": 100, "batch_real": 4, "model": "convnet-w16", "compile_real": "on"})
    asked: list[float] = []

    def is_cancelled() -> bool:  # the cancel arrives 0.3 s into the loop's first iteration (the compile warm-up)
        return bool(asked) and time.monotonic() - asked[0] > 0.3

    def progress(stage: str, fraction: float, message: str | None = None) -> None:
        if stage == "distill" and not asked:
            asked.append(time.monotonic())

    ctx = RunContext(dataset=mnist, ipc=1, max_per_class=10, is_cancelled=is_cancelled, progress_sink=progress)
    with pytest.raises(Cancelled):
        dm().run(ctx, params)
    assert asked and time.monotonic() - asked[0] < 2.0  # compiling alone takes longer than that
