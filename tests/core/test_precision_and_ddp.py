"""Precision switches and data parallelism of teacher training (distill.precision, distill.evaluate)."""

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
from accelerate import PartialState
from distill.data import get_dataset
from distill.evaluate import train_on_split
model = train_on_split(get_dataset("mnist"), "convnet", 1, 0, torch.device("cpu"), max_per_class=20, batch_size=50,
                       augment=False, precision="fp32")
if PartialState().is_main_process:
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, sys.argv[1])
"""


def test_precision_settings_keep_fp32_exact_and_auto_is_cuda_only_for_evaluation() -> None:
    cpu = torch.device("cpu")
    assert precision_dtype("fp32", cpu) is None and precision_dtype("bf16", cpu) is torch.bfloat16
    assert precision_dtype("auto", cpu, cuda_only_auto=True) is None  # evaluation on a CPU: fp32 as before
    with pytest.raises(DistillError, match="unknown --precision"):
        precision_dtype("fp16", cpu, "--precision")


@pytest.mark.timeout(300)
def test_teacher_training_data_parallel_over_two_processes_equals_one(mnist, tmp_path: Path) -> None:
    """torchrun + accelerate (gloo on the CPU): each process takes half of every global batch and DDP averages
    the gradients, so two processes train the same network as one (to float rounding)."""
    from distill.evaluate import train_on_split

    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                             str(tmp_path / "two.pt")], capture_output=True, text=True, timeout=280, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    one = train_on_split(mnist, "convnet", 1, 0, torch.device("cpu"), max_per_class=20, batch_size=50, augment=False,
                         precision="fp32").state_dict()
    two = torch.load(tmp_path / "two.pt")
    assert max(float((one[k].float() - two[k].float()).abs().max()) for k in one) < 1e-5
