"""DATM: soft labels from expert logits are learned and archived, correct-sample init, growing start range."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.archive import read_archive
from distill.evaluate import EvalConfig, evaluate_distilled
from distill.methods.base import RunContext
from distill.methods.registry import parse_params
from distill.runner import RunRequest, run_to_archive
from pixelspace.datm import (
    DATM_DEFAULTS,
    DATM_TABLE,
    DifficultyAlignedTrajectoryMatching,
    init_correct,
    init_soft_labels,
    upper_bound,
)
from pixelspace.experts import FlatModel
from pixelspace.mtt import get_buffer, resolve

TINY_RUN = dict(experts=2, expert_train_epochs=2, expert_model="convnet-w16", expert_epochs=1, max_start_epoch=1,
                min_start_epoch=0, sequential_generation=False)


def test_datm_learns_soft_labels_and_loss_decreases(mnist):
    ctx = RunContext(dataset=mnist, ipc=2, seed=0, max_per_class=20)
    params = parse_params(DifficultyAlignedTrajectoryMatching,
                          TINY_RUN | dict(iterations=16, syn_steps=2, lr_img=100.0, lr_y=5.0, threshold=10.0,
                                          dsa_strategy="none"))
    out = DifficultyAlignedTrajectoryMatching().run(ctx, params)
    m = out.metrics
    assert out.soft_labels is not None and out.soft_labels.shape == (20, 10)
    assert torch.bincount(out.labels).tolist() == [2] * 10
    assert m["loss_last"] < 0.9 * m["loss_first"], m
    assert m["skipped_updates"] == 0 and out.learned_lr is not None

    # soft labels started from expert logits and were learned
    buffer = get_buffer(ctx, params)
    start_labels, _ = init_soft_labels(ctx, buffer, out.images, out.labels, None)
    assert not torch.allclose(start_labels, out.soft_labels, atol=1e-3)


def test_init_picks_images_an_expert_classifies_correctly(mnist):
    ctx = RunContext(dataset=mnist, ipc=2, seed=0, max_per_class=20)
    buffer = get_buffer(ctx, parse_params(DifficultyAlignedTrajectoryMatching, TINY_RUN))
    images, shortfall = init_correct(ctx, buffer, np.random.default_rng(0))
    labels = torch.arange(10).repeat_interleave(2)
    model = FlatModel(buffer.build_net(mnist))
    with torch.no_grad():
        preds = [model(buffer.snapshot(e, buffer.epochs), mnist.normalize(images)).argmax(1)
                 for e in range(buffer.num_experts)]
    ok = torch.stack([p == labels for p in preds]).any(0)
    assert int((~ok).sum()) <= shortfall  # only the counted fill-ins may be misclassified by every expert
    soft, fallback = init_soft_labels(ctx, buffer, images, labels, None)
    assert soft.shape == (20, 10) and fallback <= shortfall


def test_datm_soft_labels_reach_the_archive_and_eval(mnist, tmp_path):
    params = TINY_RUN | dict(iterations=2, syn_steps=2, threshold=10.0)
    run_to_archive(RunRequest("mnist", "datm", 1, params, max_per_class=20, device="cpu"), tmp_path / "d.tar")
    loaded = read_archive(tmp_path / "d.tar").distilled
    assert loaded.soft_labels is not None and loaded.soft_labels.shape == (10, 10)
    res = evaluate_distilled(loaded, mnist, EvalConfig(model="convnet-w16", runs=1, epochs=1, test_limit=50))
    assert res.lr == pytest.approx(loaded.learned_lr)


def test_upper_bound_grows_to_max_and_table_defaults():
    p = parse_params(DifficultyAlignedTrajectoryMatching, {})
    r = resolve(p, DATM_TABLE, DATM_DEFAULTS, "cifar10", 10)
    assert (r["current_max_start_epoch"], r["max_start_epoch"], r["expansion_end_epoch"]) == (10, 20, 1000)
    bounds = [upper_bound(r, it, 20) for it in (0, 500, 1000, 5000)]
    assert bounds == [10, 15, 20, 20]
    assert upper_bound(r | {"sequential_generation": False}, 0, 20) == 20
    d = resolve(p, DATM_TABLE, DATM_DEFAULTS, "mnist", 1)
    assert (d["syn_steps"], d["pix_init"], d["threshold"]) == (80, "samples_predicted_correctly", 1.0)
