"""Evaluation at ImageNet resolution: a 224 px archive evaluates within a stated memory bound (peak RSS of the
`distill eval` process), with ResNet-18 by default, the test split streamed, progress on stderr with --json;
and a torchvision-format ResNet-18 checkpoint loads as a teacher."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

from distill.evaluate import EvalConfig, get_teacher
from distill.nets import ResNet18, torchvision_resnet18_key
from distill.training import activation_bytes, batch_for, resolve_model

PEAK_RSS_BOUND_GB = 3.0  # the stated bound: torch + ResNet-18 at 224 px + one bounded batch, not the test split


def _distill(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DISTILL_NUM_THREADS="1", DISTILL_LOADER_WORKERS="1")
    return subprocess.run([sys.executable, "-c", "from distill.cli import main; main()", *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_eval_224px_archive_within_memory_bound(tmp_path: Path, synthetic_imagenet):
    root = tmp_path / "inet"
    synthetic_imagenet.generate(root, classes=3, per_class=3, val_per_class=12, seed=0, workers=1, size_scale=0.6, quiet=True)
    dataset = f"imagefolder:{root}@224"
    archive = tmp_path / "r.tar"
    run = _distill("run", "random", "--dataset", dataset, "--ipc", "2", "--out", str(archive), "--quiet")
    assert run.returncode == 0, run.stderr
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = _distill("eval", str(archive), "--runs", "1", "--epochs", "1", "--json", "--device", "cpu")
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # kB -> GiB (max over children)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["model"] == "resnet18" and payload["test_images"] == 36
    assert payload["settings"]["test_batch"] <= 500
    stages = {line.split()[1] for line in result.stderr.splitlines() if line.startswith("eval: ")}
    assert {"train", "test"} <= stages, result.stderr  # progress visible on stderr with --json
    assert peak_gb < PEAK_RSS_BOUND_GB or before / 2**20 >= PEAK_RSS_BOUND_GB, peak_gb


def test_batch_sizes_follow_the_memory_budget():
    assert resolve_model("auto", 224) == "resnet18" and resolve_model("auto", 32) == "convnet"
    big = batch_for(2.0, activation_bytes("convnet", 3, 224, False), 500)
    assert big < 500 and batch_for(2.0, activation_bytes("convnet", 1, 28, False), 500) == 500
    assert batch_for(0.001, activation_bytes("resnet18", 3, 224, True), 256) == 1


def test_torchvision_checkpoint_as_teacher(tmp_path: Path, cifar10):
    ours = ResNet18(3, 10, cifar_stem=False)
    inverse = {torchvision_resnet18_key(k): k for k in _torchvision_keys()}
    assert set(inverse) == set(ours.state_dict())  # every torchvision key maps onto this module, one to one
    state = {inverse[k]: v for k, v in ours.state_dict().items()}
    torch.save(state, tmp_path / "resnet18.pth")
    teacher = get_teacher(cifar10, EvalConfig(protocol="softlabel", teacher_checkpoint=str(tmp_path / "resnet18.pth")))
    x = torch.randn(2, 3, 64, 64)
    ours.eval()
    torch.testing.assert_close(teacher(x), ours(x))


def _torchvision_keys() -> list[str]:
    """torchvision.models.resnet18().state_dict() keys (torchvision is not a dependency)."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight", *[f"bn1.{b}" for b in bn]]
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            keys += [f"{p}.conv1.weight", *[f"{p}.bn1.{b}" for b in bn], f"{p}.conv2.weight", *[f"{p}.bn2.{b}" for b in bn]]
            if layer > 1 and block == 0:
                keys += [f"{p}.downsample.0.weight", *[f"{p}.downsample.1.{b}" for b in bn]]
    return keys + ["fc.weight", "fc.bias"]
