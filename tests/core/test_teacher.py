"""Teacher training (distill.teacher) as a stage of a run: progress, cancellation, the run's image cap, batches
through the streaming loader; and the training budget taken from the device (distill.training)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.errors import Cancelled
from distill.methods.base import RunContext
from distill.methods.baselines import Herding
from distill.methods.registry import parse_params
from distill.teacher import TeacherSpec, get_teacher, teacher_path, train_on_split, training_indices
from distill.training import CUDA_FREE_FRACTION, DEFAULT_MEMORY_GB, memory_budget_gb, on_device


@pytest.fixture
def fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An empty DISTILL_HOME: no cached teacher or features, so the teacher is really trained."""
    from distill.config import reload_settings

    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    reload_settings()
    yield tmp_path / "home"
    monkeypatch.undo()
    reload_settings()


def test_herding_with_a_teacher_reports_a_teacher_stage_and_respects_the_cap(mnist, fresh_home: Path):
    seen: list[tuple[str, float]] = []
    ctx = RunContext(dataset=mnist, ipc=1, seed=3, max_per_class=20,
                     progress_sink=lambda stage, fraction, message=None: seen.append((stage, fraction)))
    params = parse_params(Herding, {"features": "teacher", "teacher_epochs": 3})
    result = Herding().run(ctx, params)
    assert torch.bincount(result.labels).tolist() == [1] * 10
    teacher = [f for stage, f in seen if stage == "teacher"]
    assert teacher[0] == 0.0 and teacher[-1] == 1.0 and len(teacher) >= 4  # one report per epoch at least
    assert teacher == sorted(teacher)
    stages = [stage for stage, _ in seen]
    assert stages.index("teacher") < stages.index("embed") < stages.index("select")
    # the teacher saw exactly the run's 20 images per class (its cache name says so), not all 60,000
    spec = TeacherSpec(model="convnet", epochs=3, max_per_class=20, run_sample=True, seed=3)
    assert teacher_path(mnist, spec).exists()
    assert not teacher_path(mnist, TeacherSpec(model="convnet", epochs=3, seed=3)).exists()
    rows = training_indices(mnist, 20, np.random.default_rng(3), 3, run_sample_only=True)
    assert np.array_equal(rows, ctx.train.index)  # type: ignore[attr-defined]


def test_teacher_training_stops_promptly_on_cancel(mnist, fresh_home: Path):
    cancel_at: list[float] = []

    def sink(stage: str, fraction: float, message: str | None = None) -> None:
        if stage == "teacher" and fraction > 0 and not cancel_at:
            cancel_at.append(time.monotonic())  # the cancel arrives once training is under way

    ctx = RunContext(dataset=mnist, ipc=1, seed=4, max_per_class=300, progress_sink=sink,
                     is_cancelled=lambda: bool(cancel_at))
    params = parse_params(Herding, {"features": "teacher", "teacher_epochs": 50})
    with pytest.raises(Cancelled):
        Herding().run(ctx, params)
    assert cancel_at and time.monotonic() - cancel_at[0] < 2.0
    assert not (fresh_home / "teachers").exists() or not list((fresh_home / "teachers").iterdir())  # nothing cached


def test_a_cached_teacher_reports_its_stage_done(mnist, fresh_home: Path):
    spec = TeacherSpec(model="convnet", epochs=1, max_per_class=10, seed=5)
    first = get_teacher(mnist, spec)
    seen: list[tuple[str, float]] = []
    again = get_teacher(mnist, spec, progress=lambda stage, fraction: seen.append((stage, fraction)))
    assert seen == [("teacher", 1.0)]
    x = mnist.normalize(mnist.test.load(range(8)).float() / 255)
    torch.testing.assert_close(first(x), again(x))


def test_teacher_batches_stream_and_skip_an_undecodable_file(tmp_path: Path, synthetic_imagenet):
    """Training reads through the loader: a corrupt file is skipped (the serial decode would stop the run)."""
    from distill.data import readers
    from distill.data.registry import Dataset, FileSplit

    root = tmp_path / "imagenet"
    synthetic_imagenet.generate(root, classes=3, per_class=6, val_per_class=1, seed=0, workers=1, size_scale=0.2,
                                quiet=True)
    classes, files, labels = readers.list_imagefolder(root / "train")
    (root / "train" / files[4]).write_bytes(b"not a jpeg")
    train = FileSplit(root / "train", files, labels, 24, 3)  # on disk, as ImageNet is
    dataset = Dataset(name="files", classes=classes, channels=3, image_size=24, mean=(0.5,) * 3, std=(0.25,) * 3,
                      train=train, test=train)
    with pytest.raises(readers.BadImageError):
        train.load(range(len(train)))
    seen: list[float] = []
    model = train_on_split(dataset, "convnet", 2, 0, torch.device("cpu"), batch_size=8, num_workers=1,
                           progress=lambda stage, fraction: seen.append(fraction))
    assert not model.training and seen[-1] == 1.0
    assert model(torch.zeros(2, 3, 24, 24)).shape == (2, 3)


def test_memory_budget_comes_from_the_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert memory_budget_gb(cpu) == DEFAULT_MEMORY_GB
    assert memory_budget_gb(cpu, 0.5) == 0.5  # the user's budget wins
    free = 40 * 2**30
    assert memory_budget_gb(gpu, free_bytes=lambda device: free) == pytest.approx(CUDA_FREE_FRACTION * 40)
    assert memory_budget_gb(gpu, 3.0, free_bytes=lambda device: free) == 3.0


def test_channels_last_only_on_cuda():
    from distill.nets import build_network

    model = on_device(build_network("convnet", 3, 10, 32, seed=0), torch.device("cpu"))
    weight = next(m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert weight.is_contiguous()  # the CPU keeps the default layout
