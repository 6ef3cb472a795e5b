"""Precision switches and data parallelism of teacher training (distill.precision, distill.training, distill.teacher)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.errors import DistillError
from distill.precision import precision_dtype

SCRIPT = """
import sys, torch
from distill.data import get_dataset
from distill.teacher import train_on_split
from distill.training import finish_data_parallel
model = train_on_split(get_dataset("mnist"), "convnet", 1, 0, torch.device("cpu"), max_per_class=20, batch_size=50,
                       augment=False, precision="fp32")
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
    """torchrun + accelerate (gloo on the CPU): each process takes half of every global batch and DDP averages
    the gradients, so two processes train the same network as one (to float rounding)."""
    from distill.teacher import train_on_split

    _run_script(SCRIPT, tmp_path / "two.pt", processes=2)
    one = train_on_split(mnist, "convnet", 1, 0, torch.device("cpu"), max_per_class=20, batch_size=50, augment=False,
                         precision="fp32").state_dict()
    two = torch.load(tmp_path / "two.pt")
    assert max(float((one[k].float() - two[k].float()).abs().max()) for k in one) < 1e-5


STUDENT_SCRIPT = """
import sys, numpy as np, torch
from distill.data import get_dataset
from distill.evaluate import EvalConfig, test_accuracy, train_student_dc
from distill.training import finish_data_parallel
ds = get_dataset("mnist")
images = ds.train.load(np.arange(9)).float() / 255  # 9 images, batch 4: the last batch's second share is empty
labels = torch.from_numpy(ds.train.labels[:9])
weights = torch.linspace(0.5, 1.5, 9)
config = EvalConfig(model="convnet-w16", epochs=3, batch_size=4, augment="none", precision="fp32", device="cpu")
model = train_student_dc(images, labels, ds, config, 7, weights=weights)
accuracy = test_accuracy(model, ds, torch.device("cpu"), np.arange(51), batch=10, precision="fp32")
if finish_data_parallel():
    torch.save({"state": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "accuracy": accuracy},
               sys.argv[1])
"""


def test_students_and_test_pass_data_parallel_over_two_processes_equal_one(tmp_path: Path) -> None:
    """Evaluation students (dc protocol, weighted) and the test pass over two processes: the same network and
    the same accuracy as one process, also when a process's share of a batch is empty."""
    _run_script(STUDENT_SCRIPT, tmp_path / "two.pt", processes=2)
    _run_script(STUDENT_SCRIPT, tmp_path / "one.pt", processes=1)
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert max(float((a["state"][k].float() - b["state"][k].float()).abs().max()) for k in a["state"]) < 1e-5
    assert a["accuracy"] == b["accuracy"]
