"""The one evaluation routine: fresh students trained on a distilled set, accuracy on the real test split.

Protocols
- ``dc`` (DC/DSA/DM/MTT): SGD momentum 0.9, weight decay 5e-4, lr 0.01 or the archive's learned lr,
  x0.1 at epoch E//2+1 of E+1 epochs, batch 256, DSA augmentation (per-sample, non-Siamese) during
  training, test once at the end. Per-image weights (if any) weight the loss; soft labels (if any) are
  targets of a soft cross-entropy (DATM's evaluation).
- ``softlabel`` (SRe2L/RDED style): a teacher trained on the full train split (trained once, cached)
  labels every augmented batch online; students minimise KL at temperature T, AdamW lr 1e-3,
  wd 0.01, half-cosine schedule, per-image weights from the archive.
- ``dd`` (DD's own evaluation, docs/METHODS.md §1): a freshly initialised network takes exactly the T plain
  SGD steps a DD archive learned (step t on distilled batch t mod S with learned lr t; no augmentation), then
  is tested. Needs the archive's ``step_lrs`` and ``dd_step``; "epochs" are the passes over the distilled
  batches (DD's distill_epochs).

The control (DD-Ranking's point): with ``control_ipc`` the same routine also scores a random real subset of
that IPC (the ``random`` baseline, same seed) under the same protocol, budget and network, cached under
``DISTILL_HOME/controls``, and reports the gain over it. Under ``softlabel`` most of the accuracy is the
teacher's; the gain over random images is what the distilled set itself adds.

Memory is bounded by a batch, not by the set or the test split: distilled images stay in their stored dtype
(uint8 for decoded latents) and are converted per batch; a training batch whose activations would exceed
``memory_gb`` is run as micro-batches with gradient accumulation (same loss, same update); the test split is
streamed through the loader (:class:`distill.data.loader.ImageStream`) in batches sized by the same budget.
``model="auto"``: ConvNet below 128 px, ResNet-18 at the data's resolution from 128 px (the DDOQ / RDED
protocol for ImageNet); forward passes run under the ``precision`` setting. A teacher can be a local
torchvision-format ResNet-18 checkpoint (``teacher_checkpoint``); otherwise it is trained once
(:mod:`distill.teacher`). Every loop calls an optional ``check_cancelled`` before each step and test batch (it
raises to stop), so an evaluation run as a job stops within a step of a cancel.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from distill import teacher as teachers
from distill.augment import augment_for_training, check_strategy, strategy_for
from distill.config import get_settings
from distill.data.registry import Dataset, as_pixels, to_float
from distill.data.sampling import random_per_class
from distill.errors import DistillError
from distill.fastpath import FastPath, compile_wanted, prepare, resolve_switch, run_work
from distill.files import atomic_write_json
from distill.methods.base import DistilledSet, usable_learned_lr
from distill.nets import Classifier, build_network
from distill.precision import precision_dtype
from distill.training import (
    DEFAULT_MEMORY_GB,
    CancelCheck,
    Progress,
    activation_bytes,
    batch_for,
    data_parallel,
    end_data_parallel,
    memory_budget_gb,
    on_device,
    resolve_model,
    smallest_over_processes,
    training_precision,
)
from distill.training import finish_data_parallel as finish_data_parallel  # the CLI ends its runs with it

PROTOCOLS = ("dc", "softlabel", "dd")


@dataclass
class EvalConfig:
    protocol: str = "dc"
    model: str = "auto"  # auto: convnet below 128 px, resnet18 from 128 px
    runs: int = 5
    epochs: int | None = None  # None: 1000 (dc) / 300 (softlabel)
    lr: float | None = None  # None: the archive's learned lr, else 0.01 (dc) / 1e-3 (softlabel)
    batch_size: int = 256
    augment: str = "auto"  # DSA strategy; 'auto' picks by dataset, 'none' disables, 'dc' = DC's MNIST augmentation
    seed: int = 0
    test_limit: int | None = None  # evaluate on a seeded stratified subset of the test split
    temperature: float = 4.0
    teacher_model: str = "auto"
    teacher_epochs: int = 15
    teacher_max_per_class: int | None = None
    teacher_checkpoint: str | None = None  # a local torchvision-format ResNet-18 state dict (.pth / .safetensors)
    device: str = "cpu"
    # The fast path (distill.fastpath): precision fp32 (reference-exact), bf16 autocast, or auto (bf16 where the
    # hardware runs it natively: CUDA GPUs with bf16, CPUs with AVX512-BF16 / AMX); torch.compile 'auto' (runs
    # long enough to repay compilation), 'on' or 'off'; channels_last 'auto' (CUDA, and bf16 batch-norm networks on
    # a CPU), 'on' or 'off'. precision fp32 with compile off is the reference-exact path, bit for bit.
    precision: str = "auto"
    compile: str = "auto"
    channels_last: str = "auto"
    test_batch: int | None = None  # None: sized by the memory budget (at most 500)
    # activation budget of one forward/backward pass (GiB); None: from the device (distill.training.memory_budget_gb)
    memory_gb: float | None = None

    def __post_init__(self) -> None:
        check_strategy(self.augment)
        resolve_switch(self.compile, "compile")
        resolve_switch(self.channels_last, "channels_last")

    def resolved_epochs(self) -> int:
        return self.epochs if self.epochs is not None else (1000 if self.protocol == "dc" else 300)

    def memory_budget(self) -> float:
        return memory_budget_gb(torch.device(self.device), self.memory_gb)

    def teacher_spec(self) -> teachers.TeacherSpec:
        return teachers.TeacherSpec(model=self.teacher_model, epochs=self.teacher_epochs,
                                    max_per_class=self.teacher_max_per_class, seed=self.seed, precision=self.precision,
                                    compile=self.compile, device=self.device, checkpoint=self.teacher_checkpoint)


@dataclass
class EvalResult:
    dataset: str
    model: str
    protocol: str
    epochs: int
    runs: int
    accuracies: list[float]
    lr: float
    wall_seconds: float
    test_images: int
    train_images: int
    settings: dict = field(default_factory=dict)
    control: EvalResult | None = None  # random real images, same ipc / protocol / budget / network / seed

    @property
    def gain(self) -> float | None:
        """Accuracy points over the random-subset control (None without a control)."""
        return None if self.control is None else self.accuracy_mean - self.control.accuracy_mean

    @property
    def accuracy_mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def accuracy_std(self) -> float:
        return statistics.pstdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    def to_json(self) -> dict:
        out = asdict(self)
        out["accuracy_mean"] = round(self.accuracy_mean, 3)
        out["accuracy_std"] = round(self.accuracy_std, 3)
        out["accuracies"] = [round(a, 3) for a in self.accuracies]
        out.pop("control")
        if self.control is not None and self.gain is not None:
            out["control"] = self.control.to_json()
            out["gain"] = round(self.gain, 3)
        return out


def _test_indices(dataset: Dataset, limit: int | None, seed: int) -> np.ndarray:
    labels = dataset.test.labels
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed + 104729)
    per_class = max(1, limit // dataset.num_classes)
    picks = [rng.choice(np.flatnonzero(labels == c), size=min(per_class, int((labels == c).sum())), replace=False)
             for c in range(dataset.num_classes)]
    return np.sort(np.concatenate(picks))


@torch.no_grad()
def test_accuracy(model: nn.Module, dataset: Dataset, device: torch.device, indices: np.ndarray, batch: int = 500,
                  precision: str = "auto", progress: Progress | None = None,
                  check_cancelled: CancelCheck | None = None, *, compile: str | bool = "off",
                  channels_last: str | bool = "auto") -> float:
    """Accuracy on ``dataset.test[indices]``, streamed through the loader (decode ahead in worker processes);
    a test file that cannot be decoded counts as wrong (the denominator stays ``len(indices)``). The passes run
    on the fast path of ``precision`` / ``compile`` / ``channels_last`` (:func:`distill.fastpath.prepare`)."""
    from distill.data.loader import ImageStream

    model.eval()
    rank, world, device = data_parallel(device)
    fast = prepare(model, device, precision, compile, channels_last)
    share = indices[rank::world]  # several processes: each tests a strided share, the counts are summed
    correct, seen = 0, 0
    for chunk, images in ImageStream(dataset.test, share, batch_size=batch, device=device):
        if check_cancelled is not None:
            check_cancelled()
        x = dataset.normalize(to_float(images.to(device, non_blocking=True)))
        pred = fast.logits(x).argmax(1).cpu()
        correct += int((pred == torch.from_numpy(dataset.test.labels[chunk])).sum())
        seen += len(chunk)
        if progress is not None:
            progress("test", seen / max(1, len(share)))
    if world > 1:
        total = torch.tensor([correct], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total)
        correct = int(total.item())
    return 100.0 * correct / max(1, len(indices))


def _per_sample_loss(logits, hard, soft, weights) -> torch.Tensor:
    if soft is not None:
        per_sample = -(soft * F.log_softmax(logits, dim=1)).sum(1)
    else:
        per_sample = F.cross_entropy(logits, hard, reduction="none")
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample


def _student_step(fast: FastPath, batch_idx: torch.Tensor, micro: int, rank: int, world: int,
                  augment: Callable[..., torch.Tensor],
                  per_sample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """The gradients of one optimiser step on ``batch_idx``: in one process, per micro-batch (one unless
    activations exceed the memory budget) the mean loss weighted by its share of the batch; over several
    processes :func:`_data_parallel_step`. ``per_sample(x, idx)`` is the per-image loss of images ``idx``."""
    if world > 1:
        _data_parallel_step(fast, batch_idx, micro, rank, world, augment,
                            lambda x, idx: per_sample(x, idx).sum())
        return
    for part in batch_idx.split(micro):
        (per_sample(augment(part), part).mean() * (len(part) / len(batch_idx))).backward()


def _data_parallel_step(fast: FastPath, batch_idx: torch.Tensor, micro: int, rank: int, world: int,
                        augment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """The gradients of one optimiser step on the batch ``batch_idx`` when ``world`` processes share it (DDP):
    the gradients one process computes for the whole batch, to float rounding.

    The batch is cut into the micro-batches one process runs (``micro`` images each), so augmentation is drawn
    per micro-batch as there; this process takes rows ``rank::world`` of each: ``augment(part, rows)`` returns
    those rows augmented, drawing the parameters of the whole part (every process's generator stays in step).
    It runs its rows in as many micro-batches as rank 0 (the process with the most), accumulating under
    ``no_sync`` until the last, whose backward all-reduces; a process with no rows in one runs
    :meth:`FastPath.idle_loss`, so every process takes part in every reduction. ``loss_sum(x, idx)`` is the sum
    of the per-sample losses of images ``idx``: divided by the batch size and multiplied by ``world``, since DDP
    averages the processes' gradients."""
    xs, idxs = [], []
    parts = batch_idx.split(micro)
    for part in parts:
        rows = torch.arange(len(part))[rank::world]
        xs.append(augment(part, rows))
        idxs.append(part[rows.to(part.device)])
    x, idx = torch.cat(xs), torch.cat(idxs)
    chunks = max(1, math.ceil(sum(math.ceil(len(part) / world) for part in parts) / micro))
    scale = world / len(batch_idx)
    for k, (x_chunk, idx_chunk) in enumerate(zip(x.tensor_split(chunks), idx.tensor_split(chunks), strict=True)):
        with fast.no_sync() if k < chunks - 1 else contextlib.nullcontext():
            loss = loss_sum(x_chunk, idx_chunk) * scale if len(idx_chunk) else fast.idle_loss(x.shape[1:])
            loss.backward()


def _fresh_student(dataset: Dataset, config: EvalConfig,
                   run_seed: int) -> tuple[Classifier, str, torch.device, int, int]:
    """The student of one run (dc and softlabel): the configured network (``auto`` resolved), seeded, on this
    process's device; with its rank and world size (:func:`data_parallel`)."""
    rank, world, device = data_parallel(torch.device(config.device))
    model_name = resolve_model(config.model, dataset.image_size)
    model = on_device(build_network(model_name, dataset.channels, dataset.num_classes, dataset.image_size, seed=run_seed),
                      device)
    return model, model_name, device, rank, world


def student_compiles(config: EvalConfig, dataset: Dataset, images: int, epochs: int, batch: int,
                     network: nn.Module | None = None) -> bool:
    """Whether a student of ``config`` is compiled: ``compile`` 'on' / 'off', or 'auto' by the run's work and
    network (:func:`distill.fastpath.compile_wanted`; the student itself, or one built to look at); its test
    passes follow the same decision."""
    steps = epochs * math.ceil(images / batch)
    if network is None:
        network = build_network(resolve_model(config.model, dataset.image_size), dataset.channels,
                                dataset.num_classes, dataset.image_size)
    return compile_wanted(config.compile, torch.device(config.device), run_work(steps, min(images, batch),
                                                                                dataset.image_size), network)


def softlabel_batch(config: EvalConfig) -> int:
    """Protocol softlabel's batch: 100 unless the user set one (RDED's small-set batch)."""
    return min(config.batch_size, 100) if config.batch_size == 256 else config.batch_size


def _student_path(model: Classifier, device: torch.device, config: EvalConfig, compiled: bool,
                  world: int = 1) -> FastPath:
    return prepare(model, device, config.precision, compiled, config.channels_last, data_parallel=world > 1)


def train_student_dc(
    images: torch.Tensor,
    labels: torch.Tensor,
    dataset: Dataset,
    config: EvalConfig,
    run_seed: int,
    *,
    soft_targets: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    lr: float = 0.01,
    progress: Progress | None = None,
    check_cancelled: CancelCheck | None = None,
) -> Classifier:
    """DC protocol student: SGD(m 0.9, wd 5e-4), E+1 epochs, lr x0.1 at E//2+1, DSA augmentation.

    Under ``accelerate launch`` / ``torchrun`` the network runs in DistributedDataParallel and each process
    takes a share of every batch, augmented as one process would augment those images
    (:func:`_data_parallel_step`), so the step is the one-process step of the whole batch; BatchNorm as in
    :func:`distill.training.wrap_data_parallel` (synchronised on CUDA, per process on the CPU)."""
    model, model_name, device, rank, world = _fresh_student(dataset, config, run_seed)
    epochs = config.resolved_epochs()
    fast = _student_path(model, device, config, student_compiles(config, dataset, len(images), epochs + 1,
                                                                 config.batch_size, model), world)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    micro = batch_for(config.memory_budget(), activation_bytes(model_name, dataset.channels, dataset.image_size, True),
                      config.batch_size)
    if world > 1:
        micro = smallest_over_processes(micro, device)  # every process cuts the batch the same way
    x_all = images.to(device)  # stored dtype (uint8 or float); normalised per batch
    y_all = labels.to(device)
    soft_all = soft_targets.to(device) if soft_targets is not None else None
    w_all = weights.to(device) if weights is not None else None
    strategy = strategy_for(dataset.digits) if config.augment == "auto" else config.augment
    generator = torch.Generator().manual_seed(run_seed)
    n = len(x_all)

    def augment(part: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return augment_for_training(dataset.normalize(as_pixels(x_all[part])), strategy, generator, rows)

    def per_sample(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return _per_sample_loss(fast.logits(x), y_all[idx], soft_all[idx] if soft_all is not None else None,
                                w_all[idx] if w_all is not None else None)

    model.train()
    for epoch in range(epochs + 1):
        if epoch == epochs // 2 + 1:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, config.batch_size):
            if check_cancelled is not None:
                check_cancelled()
            batch_idx = order[start : start + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            _student_step(fast, batch_idx, micro, rank, world, augment, per_sample)
            optimizer.step()
        if progress is not None and epoch % 10 == 0:
            progress("train", epoch / (epochs + 1))
    return end_data_parallel(model) if world > 1 else model


def train_student_softlabel(
    images: torch.Tensor,
    dataset: Dataset,
    config: EvalConfig,
    run_seed: int,
    teacher: nn.Module,
    *,
    weights: torch.Tensor | None = None,
    lr: float = 1e-3,
    progress: Progress | None = None,
    check_cancelled: CancelCheck | None = None,
) -> Classifier:
    """RDED-style student: the teacher relabels each augmented batch; KL at temperature T; AdamW, half-cosine.
    Data parallel over processes as :func:`train_student_dc`."""
    model, model_name, device, rank, world = _fresh_student(dataset, config, run_seed)
    teacher = teacher.to(device)
    epochs = config.resolved_epochs()
    batch = softlabel_batch(config)
    fast = _student_path(model, device, config, student_compiles(config, dataset, len(images), epochs, batch, model),
                         world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda ep: 0.5 * (1 + math.cos(math.pi * ep / epochs / 2)))
    x_all = images.to(device)  # stored dtype (uint8 or float); normalised per batch
    w_all = weights.to(device) if weights is not None else None
    strategy = strategy_for(dataset.digits) if config.augment == "auto" else config.augment
    generator = torch.Generator().manual_seed(run_seed)
    temperature = config.temperature
    micro = batch_for(config.memory_budget(), activation_bytes(model_name, dataset.channels, dataset.image_size, True), batch)
    if world > 1:
        micro = smallest_over_processes(micro, device)  # every process cuts the batch the same way
    teacher.eval()
    n = len(x_all)

    def augment(part: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return augment_for_training(dataset.normalize(as_pixels(x_all[part])), strategy, generator, rows)

    def per_sample(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), training_precision(config.precision, device):
            target = F.softmax(teacher(x).float() / temperature, dim=1)
        log_p = F.log_softmax(fast.logits(x) / temperature, dim=1)
        losses = F.kl_div(log_p, target, reduction="none").sum(1) * temperature**2
        return losses * w_all[idx] if w_all is not None else losses

    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch):
            if check_cancelled is not None:
                check_cancelled()
            batch_idx = order[start : start + batch]
            optimizer.zero_grad(set_to_none=True)
            _student_step(fast, batch_idx, micro, rank, world, augment, per_sample)
            optimizer.step()
        scheduler.step()
        if progress is not None and epoch % 10 == 0:
            progress("train", epoch / epochs)
    return end_data_parallel(model) if world > 1 else model


def dd_student_network(distilled: DistilledSet, dataset: Dataset, config: EvalConfig) -> str:
    """Protocol dd's network: with ``auto`` the one DD optimised its steps for (recorded in its metrics), else
    the data's default student."""
    trained_on = distilled.metrics.get("model")
    if config.model == "auto" and isinstance(trained_on, str):
        return trained_on
    return resolve_model(config.model, dataset.image_size)


def train_student_dd(distilled: DistilledSet, dataset: Dataset, config: EvalConfig, run_seed: int) -> Classifier:
    """DD protocol: a fresh network replays the archive's learned steps (what DD optimised its images for)."""
    if "step_lrs" not in distilled.extras or "dd_step" not in distilled.extras:
        raise DistillError("protocol dd needs a DD archive (extras step_lrs and dd_step)")
    device = torch.device(config.device)
    step_lrs = distilled.extras["step_lrs"].tolist()
    step_of = distilled.extras["dd_step"].to(device)
    steps = int(step_of.max()) + 1
    x_all = dataset.normalize(distilled.images.to(device))
    y_all = distilled.labels.to(device)
    name = dd_student_network(distilled, dataset, config)
    model = build_network(name, dataset.channels, dataset.num_classes, dataset.image_size, seed=run_seed).to(device)
    model.train()
    params = list(model.parameters())
    for t, lr in enumerate(step_lrs):
        mask = step_of == t % steps
        loss = F.cross_entropy(model(x_all[mask]), y_all[mask])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(lr * g)
    return model


def _normalised_weights(distilled: DistilledSet) -> torch.Tensor | None:
    if distilled.weights is None:
        return None
    weights = distilled.weights.clamp_min(0)
    if float(weights.sum()) <= 0:
        raise DistillError("archive weights sum to zero")
    return weights / weights.mean()


def _check_evaluation(distilled: DistilledSet, dataset: Dataset, config: EvalConfig) -> None:
    """One clear error before any training: a protocol we know, a positive budget, images the dataset's shape."""
    if config.protocol not in PROTOCOLS:
        raise DistillError(f"unknown protocol '{config.protocol}'; known: {', '.join(PROTOCOLS)}")
    if config.runs < 1:
        raise DistillError("--runs must be >= 1")
    if config.epochs is not None and config.epochs < 1:
        raise DistillError("--epochs must be >= 1")
    expected = (dataset.channels, dataset.image_size, dataset.image_size)
    if tuple(distilled.images.shape[1:]) != expected:
        raise DistillError(f"archive images are {tuple(distilled.images.shape[1:])}, {dataset.name} needs {expected}")


def evaluate_distilled(
    distilled: DistilledSet,
    dataset: Dataset,
    config: EvalConfig,
    progress: Progress | None = None,
    *,
    control_ipc: int | None = None,
    check_cancelled: CancelCheck | None = None,
) -> EvalResult:
    """Train ``config.runs`` fresh students on ``distilled``; with ``control_ipc``, attach the random control.

    Protocol ``dd`` replays an archive's learned steps, which random real images do not have: no control there.
    """
    if control_ipc is not None and config.protocol != "dd":
        share = 1.0 if _control_path(dataset, control_ipc, config).exists() else 0.5
        result = evaluate_distilled(distilled, dataset, config, _scaled(progress, 0.0, share),
                                    check_cancelled=check_cancelled)
        result.control = random_control(dataset, control_ipc, config, _scaled(progress, share, 1.0),
                                        check_cancelled=check_cancelled)
        return result
    _check_evaluation(distilled, dataset, config)
    start = time.perf_counter()
    device = torch.device(config.device)
    indices = _test_indices(dataset, config.test_limit, config.seed)
    test_batch = config.test_batch or batch_for(
        config.memory_budget(), activation_bytes(config.model, dataset.channels, dataset.image_size, False), 500)
    weights = _normalised_weights(distilled)
    teacher = None
    epochs = config.resolved_epochs()
    if config.protocol == "softlabel":
        teacher = get_teacher(dataset, config, progress=progress, check_cancelled=check_cancelled).to(device)
        lr = config.lr or 1e-3
    elif config.protocol == "dd":
        lr = float(distilled.extras["step_lrs"].mean()) if "step_lrs" in distilled.extras else 0.0
        steps = int(distilled.extras["dd_step"].max()) + 1 if "dd_step" in distilled.extras else 1
        epochs = len(distilled.extras.get("step_lrs", [])) // steps
    else:
        learned = distilled.learned_lr
        if config.lr is None and learned is not None and not usable_learned_lr(learned):
            raise DistillError(f"the archive's learned lr {learned:.5g} is not a positive number: pass --lr")
        lr = config.lr or learned or 0.01
    soft = F.softmax(distilled.soft_labels, dim=1) if distilled.soft_labels is not None else None
    # test passes are compiled when the students are (dd's replay stays eager)
    compiled = config.protocol != "dd" and student_compiles(
        config, dataset, len(distilled), epochs + (config.protocol == "dc"),
        softlabel_batch(config) if config.protocol == "softlabel" else config.batch_size)
    accuracies = []
    for run in range(config.runs):
        run_seed = config.seed * 1000 + run

        def run_progress(stage: str, fraction: float, run: int = run) -> None:
            if progress is not None:
                progress(stage, (run + fraction) / config.runs)

        if config.protocol == "dd":
            model = train_student_dd(distilled, dataset, config, run_seed)
        elif teacher is not None:
            model = train_student_softlabel(distilled.images, dataset, config, run_seed, teacher, weights=weights,
                                            lr=lr, progress=run_progress, check_cancelled=check_cancelled)
        else:
            model = train_student_dc(distilled.images, distilled.labels, dataset, config, run_seed,
                                     soft_targets=soft, weights=weights, lr=lr, progress=run_progress,
                                     check_cancelled=check_cancelled)
        accuracies.append(test_accuracy(model, dataset, device, indices, test_batch, precision=config.precision,
                                        progress=run_progress, check_cancelled=check_cancelled,
                                        compile=compiled, channels_last=config.channels_last))
    return EvalResult(
        dataset=dataset.name,
        model=(dd_student_network(distilled, dataset, config) if config.protocol == "dd"
               else resolve_model(config.model, dataset.image_size)),
        protocol=config.protocol,
        epochs=epochs,
        runs=config.runs,
        accuracies=accuracies,
        lr=lr,
        wall_seconds=round(time.perf_counter() - start, 2),
        test_images=len(indices),
        train_images=len(distilled),
        settings={k: v for k, v in asdict(config).items() if k not in ("runs", "epochs", "model", "protocol")}
        | {"test_batch": test_batch, "memory_gb": round(config.memory_budget(), 2), "compiled": compiled,
           "arithmetic": "bf16" if precision_dtype(config.precision, device) else "fp32"},
    )


# ----------------------------------------------------------------------------------- random-subset control
CONTROL_VERSION = 2  # bump when the evaluation arithmetic changes, so cached controls are recomputed


def _scaled(progress: Progress | None, low: float, high: float) -> Progress | None:
    if progress is None:
        return None
    return lambda stage, fraction: progress(stage, low + (high - low) * fraction)


def _control_path(dataset: Dataset, ipc: int, config: EvalConfig) -> Path:
    """Cache file of one control: everything that changes its accuracy is in the key (device is not). The
    memory budget only splits batches into micro-batches: a budget left to the device is keyed as the CPU
    default, so a control computed on a GPU and one computed here share their file."""
    fields = {k: v for k, v in asdict(config).items() if k not in ("epochs", "device")}
    fields["memory_gb"] = DEFAULT_MEMORY_GB if config.memory_gb is None else config.memory_gb
    key = {"version": CONTROL_VERSION, "dataset": dataset.name, "ipc": ipc, "method": "random",
           "epochs": config.resolved_epochs(), **fields}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in dataset.name)[:40]
    return get_settings().home_dir / "controls" / f"{stem}-ipc{ipc}-{config.protocol}-{digest}.json"


def random_control(dataset: Dataset, ipc: int, config: EvalConfig, progress: Progress | None = None, *,
                   check_cancelled: CancelCheck | None = None) -> EvalResult:
    """Accuracy of ``ipc`` random real images per class (the ``random`` baseline, seed ``config.seed``) under
    ``config``: computed once, then read from ``DISTILL_HOME/controls``."""
    from distill.data.registry import check_ipc

    path = _control_path(dataset, ipc, config)
    if path.exists():
        stored = json.loads(path.read_text())
        fields = {k: stored[k] for k in ("dataset", "model", "protocol", "epochs", "runs", "accuracies", "lr",
                                         "wall_seconds", "test_images", "train_images", "settings")}
        return EvalResult(**fields | {"settings": stored["settings"] | {"cached": True}})
    check_ipc(dataset, ipc)
    indices = random_per_class(dataset.train, dataset.num_classes, ipc, config.seed)
    subset = DistilledSet(images=dataset.train.load(indices).float().div_(255.0),
                          labels=torch.from_numpy(dataset.train.labels[indices].copy()))
    result = evaluate_distilled(subset, dataset, config, progress, check_cancelled=check_cancelled)
    result.settings = result.settings | {"method": "random", "ipc": ipc}
    atomic_write_json(path, result.to_json())
    result.settings = result.settings | {"cached": False}
    return result


# ----------------------------------------------------------------------------------- full data / teacher
def evaluate_full(dataset: Dataset, config: EvalConfig, max_per_class: int | None = None,
                  progress: Progress | None = None, *, check_cancelled: CancelCheck | None = None) -> EvalResult:
    """Whole-dataset upper bound: the same network trained on the full train split."""
    start = time.perf_counter()
    device = torch.device(config.device)
    epochs = config.epochs or 30
    indices = _test_indices(dataset, config.test_limit, config.seed)
    accuracies = []
    for run in range(config.runs):
        model = teachers.train_on_split(dataset, config.model, epochs, config.seed * 1000 + run, device,
                                        max_per_class=max_per_class, lr=config.lr or 0.01,
                                        augment=config.augment != "none", progress=progress,
                                        precision=config.precision, check_cancelled=check_cancelled)
        accuracies.append(test_accuracy(model, dataset, device, indices, config.test_batch or batch_for(
            config.memory_budget(), activation_bytes(config.model, dataset.channels, dataset.image_size, False), 500),
            precision=config.precision, check_cancelled=check_cancelled))
    train_images = len(dataset.train) if max_per_class is None else int(
        np.minimum(dataset.train.counts(dataset.num_classes), max_per_class).sum())
    return EvalResult(
        dataset=dataset.name, model=resolve_model(config.model, dataset.image_size), protocol="full", epochs=epochs,
        runs=config.runs,
        accuracies=accuracies, lr=config.lr or 0.01, wall_seconds=round(time.perf_counter() - start, 2),
        test_images=len(indices), train_images=train_images,
        settings={"max_per_class": max_per_class, "schedule": "one-cycle SGD", "device": config.device},
    )


def get_teacher(dataset: Dataset, config: EvalConfig, progress: Progress | None = None,
                check_cancelled: CancelCheck | None = None) -> Classifier:
    """The teacher of ``config`` (its ``teacher_*`` fields, seed, precision and device): see
    :func:`distill.teacher.get_teacher`."""
    return teachers.get_teacher(dataset, config.teacher_spec(), progress=progress, check_cancelled=check_cancelled)
