"""Precision switches and data parallelism (DistributedDataParallel) of teacher and student training
(distill.precision, distill.training, distill.teacher, distill.evaluate)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.errors import DistillError
from distill.precision import precision_dtype

SCRIPT = """
import sys, torch
from distill.data import get_dataset
from distill.teacher import train_on_split
from distill.training import finish_data_parallel
model = train_on_split(get_dataset("mnist"), "convnet-w16", 2, 0, torch.device("cpu"), max_per_class=5, batch_size=7,
                       augment=True, precision="fp32", compile="off")
if finish_data_parallel():
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, sys.argv[1])
"""

def test_precision_settings_keep_fp32_exact_and_auto_follows_native_bf16() -> None:
    from distill.precision import bf16_fast_on

    cpu = torch.device("cpu")
    assert precision_dtype("fp32", cpu) is None and precision_dtype("bf16", cpu) is torch.bfloat16
    assert precision_dtype("auto", cpu) is (torch.bfloat16 if bf16_fast_on(cpu) else None)
    with pytest.raises(DistillError, match="unknown --precision"):
        precision_dtype("fp16", cpu, "--precision")


def _run_script(source: str, out: Path, processes: int) -> None:
    """Run ``source`` (writes its result to ``out``) as one process, or under torchrun as several (gloo on CPU)."""
    script = out.with_suffix(".py")
    script.write_text(source)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    result = subprocess.run([sys.executable, *launcher, str(script), str(out)], capture_output=True, text=True,
                            timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.timeout(300)
def test_teacher_training_data_parallel_over_two_processes_equals_one(mnist, tmp_path: Path) -> None:
    """torchrun + accelerate (gloo on the CPU): each process takes half of every global batch, augments it with
    the DSA parameters one process draws for those images, and DDP averages the gradients, so two processes
    train the same network as one (to float rounding); 50 images in batches of 7: the last batch (one image)
    leaves the second process an empty share."""
    from distill.teacher import train_on_split

    _run_script(SCRIPT, tmp_path / "two.pt", processes=2)
    one = train_on_split(mnist, "convnet-w16", 2, 0, torch.device("cpu"), max_per_class=5, batch_size=7, augment=True,
                         precision="fp32", compile="off").state_dict()
    two = torch.load(tmp_path / "two.pt")
    assert max(float((one[k].float() - two[k].float()).abs().max()) for k in one) < 1e-5


STUDENT_SCRIPT = """
import sys, numpy as np, torch
import distill.training
from distill.data import get_dataset
from distill.evaluate import EvalConfig, test_accuracy, train_student_dc, train_student_softlabel
from distill.nets import build_network

wrapped = []  # the wrapper every data-parallel student runs in
plain_wrap = distill.training.wrap_data_parallel
def spy(model, device):
    wrapper = plain_wrap(model, device)
    wrapped.append(type(wrapper).__name__)
    return wrapper
distill.training.wrap_data_parallel = spy

ds = get_dataset("mnist")
images = ds.train.load(np.arange(9)).float() / 255  # 9 images: the last batch leaves the second process no share
labels = torch.from_numpy(ds.train.labels[:9])
weights = torch.linspace(0.5, 1.5, 9)
soft = torch.softmax(torch.randn(9, 10, generator=torch.Generator().manual_seed(1)), 1)
base = dict(model="convnet-w16", epochs=3, precision="fp32", compile="off", device="cpu")
out = {}
# DC's own augmentation, batch 4, per-image weights
out["dc"] = train_student_dc(images, labels, ds, EvalConfig(batch_size=4, augment="dc", **base), 7, weights=weights)
# DSA (MNIST's default strategy), batch 8 in micro-batches of 2 (a memory budget of two images), soft targets
config = EvalConfig(batch_size=8, augment="auto", memory_gb=0.01, **base)
out["dsa"] = train_student_dc(images, labels, ds, config, 8, soft_targets=soft, weights=weights)
# the soft-label protocol (a fixed random teacher), DSA
teacher = build_network("convnet-w16", 1, 10, 28, seed=3).eval()
out["softlabel"] = train_student_softlabel(images, ds, EvalConfig(protocol="softlabel", batch_size=4, augment="auto",
                                                                  temperature=2.0, **base), 9, teacher)
accuracy = test_accuracy(out["dc"], ds, torch.device("cpu"), np.arange(51), batch=10, precision="fp32")
# a batch-norm network: per-process statistics on the CPU, so not the one-process network, but every process
# ends with rank 0's running statistics and the micro-batches keep DDP's buffer broadcasts in step
bn = train_student_dc(images, labels, ds, EvalConfig(batch_size=8, augment="auto", memory_gb=0.01,
                                                     **(base | {"model": "convnet-bn"})), 5)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
torch.save({k: v.detach().cpu() for k, v in bn.state_dict().items()}, sys.argv[1] + f".bn{rank}")
if distill.training.finish_data_parallel():
    torch.save({"states": {name: {k: v.detach().cpu() for k, v in m.state_dict().items()} for name, m in out.items()},
                "accuracy": accuracy, "wrapped": wrapped}, sys.argv[1])
"""


@pytest.mark.timeout(300)
def test_students_and_test_pass_data_parallel_over_two_processes_equal_one(mnist, tmp_path: Path) -> None:
    """Evaluation students over two processes in DistributedDataParallel, with augmentation on (DC's and DSA),
    micro-batches, soft targets, the soft-label protocol, and an empty share in the last batch of every epoch:
    the same networks as one process (to float rounding) and the same test accuracy."""
    import distill.training
    from distill.nets import build_network

    assert not hasattr(distill.training, "sum_gradients")  # gradients are reduced by DDP, not per parameter
    _run_script(STUDENT_SCRIPT, tmp_path / "two.pt", processes=2)
    _run_script(STUDENT_SCRIPT, tmp_path / "one.pt", processes=1)
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a["wrapped"] == [] and b["wrapped"] == ["DistributedDataParallel"] * 4  # one process: no wrapper at all
    for name, one in a["states"].items():
        two = b["states"][name]
        # AdamW (softlabel) turns the rounding noise of a gradient that is exactly zero in exact arithmetic (the
        # bias of a convolution that an instance norm follows) into full-size steps: those biases differ, the
        # function does not
        free = {f"features.{i}.bias" for i in (0, 4, 8)} if name == "softlabel" else set()
        assert max(float((one[k].float() - two[k].float()).abs().max()) for k in one if k not in free) < 1e-5, name
        nets = [build_network("convnet-w16", 1, 10, 28) for _ in range(2)]
        for net, state in zip(nets, (one, two), strict=True):
            net.load_state_dict(state)
        x = mnist.normalize(mnist.train.load(np.arange(9)).float() / 255)
        with torch.no_grad():
            assert float((nets[0](x) - nets[1](x)).abs().max()) < 1e-5, name
    assert a["accuracy"] == b["accuracy"]
    bn0, bn1 = torch.load(str(tmp_path / "two.pt") + ".bn0"), torch.load(str(tmp_path / "two.pt") + ".bn1")
    assert all(torch.equal(bn0[k], bn1[k]) for k in bn0)  # every process ends with the same batch-norm network


def test_data_parallel_batchnorm_becomes_sync_batchnorm_and_back() -> None:
    """CUDA: batch norm runs as SyncBatchNorm under DDP; afterwards the network holds plain BatchNorm2d layers
    with the same parameters and statistics (the CPU keeps per-process BatchNorm: torch has no CPU SyncBatchNorm)."""
    from torch import nn

    from distill.nets import build_network
    from distill.training import _plain_batchnorm

    model = build_network("convnet-bn", 1, 10, 28, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert nn.SyncBatchNorm.convert_sync_batchnorm(model) is model
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    _plain_batchnorm(model)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert sum(type(m) is nn.BatchNorm2d for m in model.modules()) == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert before.keys() == model.state_dict().keys()
