"""distill.fastpath: the reference-exact setting trains bit for bit like plain eager code; bf16 ('auto' on CPUs
with native bf16) trains to close losses; the switches resolve as documented."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from distill.errors import DistillError
from distill.fastpath import (
    COMPILE_MIN_WORK,
    COMPILE_VARIANTS,
    channels_last_wanted,
    compile_wanted,
    contiguous_nchw,
    prepare,
    run_work,
    train_step,
)
from distill.nets import build_network
from distill.precision import bf16_fast_on

CPU = torch.device("cpu")
STEPS = 4


def _batch(mnist) -> tuple[torch.Tensor, torch.Tensor]:
    x = mnist.normalize(mnist.train.load(list(range(64))).float().div_(255.0))
    return x, torch.from_numpy(mnist.train.labels[:64]).long()


def _optimizer(model: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0005)


def _fast_losses(mnist, precision: str, channels_last: str = "off") -> tuple[list[float], dict]:
    x, y = _batch(mnist)
    fast = prepare(build_network("convnet", 1, 10, 28, seed=0), CPU, precision, "off", channels_last)
    optimizer = _optimizer(fast.model)
    losses = [train_step(fast, optimizer, x, y) for _ in range(STEPS)]
    return losses, fast.model.state_dict()


def test_fp32_without_compile_is_bit_identical_to_plain_eager_training(mnist) -> None:
    x, y = _batch(mnist)
    model = build_network("convnet", 1, 10, 28, seed=0)
    optimizer = _optimizer(model)
    plain = []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        plain.append(float(loss.detach()))
    fast_losses, fast_state = _fast_losses(mnist, "fp32")
    assert fast_losses == plain
    assert all(torch.equal(fast_state[k], v) for k, v in model.state_dict().items())


def test_fp32_off_off_hands_the_model_back_untouched() -> None:
    model = build_network("convnet", 1, 10, 28, seed=0)
    fast = prepare(model, CPU, "fp32", "off", "off")
    assert fast.reference_exact and fast.call is model and fast.dtype is None
    assert all(p.is_contiguous() for p in model.parameters())


def test_auto_and_bf16_train_to_close_losses(mnist) -> None:
    reference, _ = _fast_losses(mnist, "fp32")
    for precision in ("auto", "bf16"):
        losses, _ = _fast_losses(mnist, precision)
        assert losses[-1] < losses[0]  # it still learns
        for got, want in zip(losses, reference, strict=True):
            assert abs(got - want) <= 0.03 * want, (precision, losses, reference)
    auto = prepare(build_network("convnet", 1, 10, 28, seed=0), CPU, "auto")
    assert auto.dtype == (torch.bfloat16 if bf16_fast_on(CPU) else None)


def test_channels_last_keeps_fp32_results_to_float_rounding(mnist) -> None:
    reference, _ = _fast_losses(mnist, "fp32")
    losses, state = _fast_losses(mnist, "fp32", channels_last="on")
    assert state["features.0.weight"].is_contiguous(memory_format=torch.channels_last)
    assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) < 1e-4


def _channels_last_strided(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the strides DSA's crop leaves (an NHWC gather permuted back to NCHW)."""
    return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def test_batches_reach_the_fast_path_in_plain_layout_and_the_reference_path_untouched() -> None:
    for channels in (3, 1):  # one channel: contiguous() alone keeps the odd channel stride
        x = _channels_last_strided(torch.randn(4, channels, 6, 6))
        plain = contiguous_nchw(x)
        assert plain.stride() == (channels * 36, 36, 6, 1) and torch.equal(plain, x)
    x = _channels_last_strided(torch.randn(4, 3, 6, 6))
    reference = prepare(build_network("convnet-w16", 3, 10, 8, seed=0), CPU, "fp32", "off", "off")
    assert reference.input(x) is x  # bit for bit what plain eager code is given
    fast = prepare(build_network("convnet-w16", 3, 10, 8, seed=0), CPU, "bf16", "off", "off")
    assert fast.input(x).stride() == (108, 36, 6, 1) and fast.input(plain) is plain


@pytest.mark.timeout(240)
def test_a_compiled_network_compiles_no_variant_for_a_channels_last_batch() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    fast = prepare(build_network("convnet-w16", 3, 10, 8, seed=0), CPU, "fp32", "on", "off")
    assert torch._dynamo.config.recompile_limit >= COMPILE_VARIANTS
    x = torch.randn(4, 3, 8, 8)
    fast.logits(x)
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    out = fast.logits(_channels_last_strided(x))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled and fast.compiled
    assert torch.allclose(out, fast.logits(x))


def test_switch_settings_resolve_as_documented() -> None:
    assert not compile_wanted("auto", CPU, COMPILE_MIN_WORK - 1) and compile_wanted("auto", CPU, COMPILE_MIN_WORK)
    # 300 evaluation epochs of 100 images: worth compiling at 64 px, not at 28 px (bench/train_speed.py)
    assert compile_wanted("auto", CPU, run_work(301, 100, 64)) and not compile_wanted("auto", CPU, run_work(301, 100, 28))
    assert not compile_wanted("auto", CPU, None)
    resnet = build_network("resnet18", 3, 10, 128)  # batch norm: compilation does not pay on a CPU
    assert not compile_wanted("auto", CPU, 10**12, resnet) and compile_wanted("on", CPU, 1, resnet)
    assert compile_wanted("auto", CPU, 10**12, build_network("convnet", 3, 10, 64))
    assert compile_wanted("on", CPU, 1) and compile_wanted(True, CPU, 1) and not compile_wanted("off", CPU, 10**6)
    assert channels_last_wanted("auto", torch.device("cuda")) and channels_last_wanted("on", CPU)
    convnet, resnet = build_network("convnet", 3, 10, 32), build_network("resnet18", 3, 10, 128)
    assert not channels_last_wanted("auto", CPU, convnet, torch.bfloat16)  # group norm: slower in channels_last
    assert channels_last_wanted("auto", CPU, resnet, torch.bfloat16) and not channels_last_wanted("auto", CPU, resnet)
    with pytest.raises(DistillError, match="unknown compile 'sometimes'"):
        compile_wanted("sometimes", CPU, 1)
    with pytest.raises(DistillError, match="unknown --precision 'fp16'"):
        prepare(build_network("convnet", 1, 10, 28, seed=0), CPU, "fp16")


def _tiny_set(mnist):
    from distill.methods.base import DistilledSet

    indices = [int(i) for c in range(10) for i in (mnist.train.labels == c).nonzero()[0][:2]]
    return DistilledSet(images=mnist.train.load(indices).float().div_(255.0),
                        labels=torch.from_numpy(mnist.train.labels[indices].copy()))


def test_evaluation_runs_the_fast_path_by_default_and_the_reference_path_on_request(mnist) -> None:
    """evaluate_distilled: ``--precision fp32 --no-compile`` is plain eager fp32 (two runs agree to the bit and
    record fp32, not compiled); the default records bf16 where the CPU has native bf16 and reaches the same
    accuracy band on this tiny task."""
    from distill.evaluate import EvalConfig, evaluate_distilled

    distilled = _tiny_set(mnist)
    common = dict(runs=1, epochs=4, test_limit=200, model="convnet-w16")
    ref = [evaluate_distilled(distilled, mnist, EvalConfig(precision="fp32", compile="off", **common))
           for _ in range(2)]
    assert ref[0].accuracies == ref[1].accuracies
    assert ref[0].settings["arithmetic"] == "fp32" and ref[0].settings["compiled"] is False
    default = evaluate_distilled(distilled, mnist, EvalConfig(**common))
    assert default.settings["arithmetic"] == ("bf16" if bf16_fast_on(CPU) else "fp32")
    assert default.settings["compiled"] is False  # 5 epochs of 20 images: too little work to repay compilation
    assert abs(default.accuracy_mean - ref[0].accuracy_mean) < 15


@pytest.mark.timeout(240)
def test_evaluation_with_compile_on_trains_and_tests_a_compiled_student(mnist) -> None:
    from distill.evaluate import EvalConfig, evaluate_distilled

    result = evaluate_distilled(_tiny_set(mnist), mnist, EvalConfig(runs=1, epochs=2, test_limit=100,
                                                                    model="convnet-w16", compile="on"))
    assert result.settings["compiled"] is True and 0 <= result.accuracy_mean <= 100


def test_evaluation_refuses_unknown_switches() -> None:
    from distill.evaluate import EvalConfig

    with pytest.raises(DistillError, match="unknown compile 'fast'"):
        EvalConfig(compile="fast")
    with pytest.raises(DistillError, match="unknown channels_last 'yes'"):
        EvalConfig(channels_last="yes")
