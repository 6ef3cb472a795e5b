"""Evaluation protocols and selection baselines on small real slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.evaluate import EvalConfig, evaluate_distilled, evaluate_full
from distill.methods.base import DistilledSet, RunContext
from distill.methods.baselines import Herding, KCenter, RandomSelection, herding_order, kcenter_order
from distill.methods.registry import parse_params
from distill.nets import build_network


def _ctx(ds, ipc, seed=0, max_per_class=60):
    return RunContext(dataset=ds, ipc=ipc, seed=seed, max_per_class=max_per_class)


def test_random_selection_is_per_class_and_seeded(mnist):
    first = RandomSelection().run(_ctx(mnist, 3), parse_params(RandomSelection, {}))
    again = RandomSelection().run(_ctx(mnist, 3), parse_params(RandomSelection, {}))
    other = RandomSelection().run(_ctx(mnist, 3, seed=1), parse_params(RandomSelection, {}))
    assert torch.bincount(first.labels).tolist() == [3] * 10
    assert torch.equal(first.images, again.images) and not torch.equal(first.images, other.images)
    assert float(first.images.min()) >= 0 and float(first.images.max()) <= 1


def test_herding_tracks_the_mean_better_than_random():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(400, 16, generator=g)
    mu = features.mean(0)
    picks = herding_order(features, 10)
    assert len(set(picks)) == 10
    herd_err = float((features[picks].mean(0) - mu).norm())
    rand_err = np.mean([float((features[torch.randperm(400, generator=g)[:10]].mean(0) - mu).norm()) for _ in range(20)])
    assert herd_err < 0.5 * rand_err


def test_kcenter_covers_better_than_random():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(300, 8, generator=g)

    def radius(idx):
        return float(torch.cdist(features, features[idx]).min(1).values.max())

    picks = kcenter_order(features, 12)
    assert len(set(picks)) == 12
    assert radius(picks) < min(radius(torch.randperm(300, generator=g)[:12]) for _ in range(10))


@pytest.mark.parametrize("method", [Herding, KCenter])
def test_coreset_methods_on_real_digits(mnist, method):
    result = method().run(_ctx(mnist, 2), parse_params(method, {}))
    assert torch.bincount(result.labels).tolist() == [2] * 10
    sources = result.extras["source_indices"]
    assert len(set(sources.tolist())) == 20


def test_dc_protocol_is_deterministic_and_learns(mnist):
    data = RandomSelection().run(_ctx(mnist, 5), parse_params(RandomSelection, {}))
    config = EvalConfig(runs=1, epochs=10, test_limit=300, seed=0)
    first = evaluate_distilled(data, mnist, config)
    second = evaluate_distilled(data, mnist, config)
    assert first.accuracies == second.accuracies
    assert first.accuracy_mean > 40 and first.lr == 0.01 and first.test_images == 300


def test_random_control_is_the_random_baseline_cached(mnist, distill_home):
    from distill.evaluate import random_control

    config = EvalConfig(runs=1, epochs=3, test_limit=200, seed=5)
    subset = RandomSelection().run(RunContext(dataset=mnist, ipc=2, seed=5), parse_params(RandomSelection, {}))
    result = evaluate_distilled(subset, mnist, config, control_ipc=2)
    # the control of a random set of the same seed is that very set: zero gain, and now cached
    assert result.control is not None and result.control.accuracies == result.accuracies and result.gain == 0
    cached = random_control(mnist, 2, config)
    assert cached.settings["cached"] is True and cached.accuracies == result.accuracies
    assert len(list((distill_home / "controls").glob("mnist-ipc2-dc-*.json"))) == 1
    # another budget is another control
    other = random_control(mnist, 2, EvalConfig(runs=1, epochs=2, test_limit=200, seed=5))
    assert other.settings["cached"] is False and other.epochs == 2


def test_learned_lr_and_weights_are_used(mnist):
    data = RandomSelection().run(_ctx(mnist, 2), parse_params(RandomSelection, {}))
    weighted = DistilledSet(images=data.images, labels=data.labels, weights=torch.rand(20) + 0.1, learned_lr=0.02)
    result = evaluate_distilled(weighted, mnist, EvalConfig(runs=1, epochs=2, test_limit=100))
    assert result.lr == 0.02


def test_softlabel_protocol_with_cached_teacher(mnist, distill_home):
    data = RandomSelection().run(_ctx(mnist, 2), parse_params(RandomSelection, {}))
    config = EvalConfig(protocol="softlabel", runs=1, epochs=5, test_limit=200, teacher_epochs=1, teacher_max_per_class=30)
    result = evaluate_distilled(data, mnist, config)
    assert 0 <= result.accuracy_mean <= 100 and result.protocol == "softlabel"
    cached = list((distill_home / "teachers").glob("mnist-convnet-e1-cap30-*.safetensors"))
    assert len(cached) == 1


def test_whole_dataset_upper_bound_on_a_slice(mnist):
    result = evaluate_full(mnist, EvalConfig(runs=1, epochs=4, test_limit=300), max_per_class=40)
    assert result.protocol == "full" and result.train_images == 400 and result.accuracy_mean > 30


@pytest.mark.parametrize(
    ("name", "size", "channels"),
    [("convnet", 28, 1), ("convnet", 32, 3), ("convnet-d4", 64, 3), ("convnet-bn", 32, 3), ("resnet18", 32, 3),
     ("resnet18-ap", 32, 3), ("resnet18", 64, 3)],
)
def test_networks_shapes(name, size, channels):
    net = build_network(name, channels, 10, size, seed=0)
    out = net(torch.randn(2, channels, size, size))
    assert out.shape == (2, 10)


def test_convnet_matches_reference_parameter_count():
    # docs/METHODS.md §2: CIFAR-10 ConvNet-3 = 320,010 parameters, MNIST = 317,706.
    assert sum(p.numel() for p in build_network("convnet", 3, 10, 32).parameters()) == 320010
    assert sum(p.numel() for p in build_network("convnet", 1, 10, 28).parameters()) == 317706


def test_lenet_is_lenet5_with_dd_init():
    net = build_network("lenet", 1, 10, 28, seed=0)
    assert sum(p.numel() for p in net.parameters()) == 61706  # LeNet-5 on 28 px (first conv padded by 2)
    assert all(float(m.bias.abs().max()) == 0 for m in net.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d))
    assert net.embed(torch.randn(3, 1, 28, 28)).shape == (3, 84)
