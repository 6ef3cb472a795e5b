"""The one evaluation routine: fresh students trained on a distilled set, accuracy on the real test split.

Protocols
- ``dc`` (DC/DSA/DM/MTT): SGD momentum 0.9, weight decay 5e-4, lr 0.01 or the archive's learned lr,
  x0.1 at epoch E//2+1 of E+1 epochs, batch 256, DSA augmentation (per-sample, non-Siamese) during
  training, test once at the end. Per-image weights (if any) weight the loss; soft labels (if any) are
  targets of a soft cross-entropy (DATM's evaluation).
- ``softlabel`` (SRe2L/RDED style): a teacher trained on the full train split (trained once, cached)
  labels every augmented batch online; students minimise KL at temperature T, AdamW lr 1e-3,
  wd 0.01, half-cosine schedule, per-image weights from the archive.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from distill.augment import diff_augment, strategy_for
from distill.config import get_settings
from distill.data.registry import Dataset, to_float
from distill.data.sampling import sample_per_class
from distill.errors import DistillError
from distill.files import atomic_output
from distill.methods.base import DistilledSet
from distill.nets import Classifier, build_network
from distill.precision import autocast_context, precision_dtype

PROTOCOLS = ("dc", "softlabel")
Progress = Callable[[str, float], None]


@dataclass
class EvalConfig:
    protocol: str = "dc"
    model: str = "convnet"
    runs: int = 5
    epochs: int | None = None  # None: 1000 (dc) / 300 (softlabel)
    lr: float | None = None  # None: the archive's learned lr, else 0.01 (dc) / 1e-3 (softlabel)
    batch_size: int = 256
    augment: str = "auto"  # DSA strategy; 'auto' picks by dataset, 'none' disables
    seed: int = 0
    test_limit: int | None = None  # evaluate on a seeded stratified subset of the test split
    temperature: float = 4.0
    teacher_model: str = "convnet"
    teacher_epochs: int = 15
    teacher_max_per_class: int | None = None
    device: str = "cpu"
    # fp32 (reference-exact), bf16 autocast, or auto: bf16 on CUDA GPUs with bf16, fp32 on the CPU (so the CPU
    # numbers in docs/BENCHMARKS.md stay reproducible)
    precision: str = "auto"

    def resolved_epochs(self) -> int:
        return self.epochs if self.epochs is not None else (1000 if self.protocol == "dc" else 300)


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
                  precision: str = "auto") -> float:
    model.eval()
    correct = 0
    for chunk, images in dataset.test.batches(batch, indices):
        x = dataset.normalize(to_float(images).to(device))
        with training_precision(precision, device):
            pred = model(x).argmax(1).cpu()
        correct += int((pred == torch.from_numpy(dataset.test.labels[chunk])).sum())
    return 100.0 * correct / max(1, len(indices))


def training_precision(precision: str, device: torch.device):
    """The autocast context of student, teacher and test passes (see ``EvalConfig.precision``)."""
    return autocast_context(device, precision_dtype(precision, device, "--precision", cuda_only_auto=True))


def _weighted_loss(logits, hard, soft, weights) -> torch.Tensor:
    if soft is not None:
        per_sample = -(soft * F.log_softmax(logits, dim=1)).sum(1)
    else:
        per_sample = F.cross_entropy(logits, hard, reduction="none")
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


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
) -> Classifier:
    """DC protocol student: SGD(m 0.9, wd 5e-4), E+1 epochs, lr x0.1 at E//2+1, DSA augmentation."""
    device = torch.device(config.device)
    epochs = config.resolved_epochs()
    model = build_network(config.model, dataset.channels, dataset.num_classes, dataset.image_size, seed=run_seed).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    x_all = dataset.normalize(images.to(device))
    y_all = labels.to(device)
    soft_all = soft_targets.to(device) if soft_targets is not None else None
    w_all = weights.to(device) if weights is not None else None
    strategy = strategy_for(dataset.digits) if config.augment == "auto" else config.augment
    generator = torch.Generator().manual_seed(run_seed)
    n = len(x_all)
    model.train()
    for epoch in range(epochs + 1):
        if epoch == epochs // 2 + 1:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            x = diff_augment(x_all[idx], strategy, generator=generator)
            with training_precision(config.precision, device):
                loss = _weighted_loss(
                    model(x), y_all[idx], soft_all[idx] if soft_all is not None else None,
                    w_all[idx] if w_all is not None else None,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if progress is not None and epoch % 10 == 0:
            progress("train", epoch / (epochs + 1))
    return model


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
) -> Classifier:
    """RDED-style student: the teacher relabels each augmented batch; KL at temperature T; AdamW, half-cosine."""
    device = torch.device(config.device)
    epochs = config.resolved_epochs()
    model = build_network(config.model, dataset.channels, dataset.num_classes, dataset.image_size, seed=run_seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda ep: 0.5 * (1 + math.cos(math.pi * ep / epochs / 2)))
    x_all = dataset.normalize(images.to(device))
    w_all = weights.to(device) if weights is not None else None
    strategy = strategy_for(dataset.digits) if config.augment == "auto" else config.augment
    generator = torch.Generator().manual_seed(run_seed)
    temperature = config.temperature
    batch = min(config.batch_size, 100) if config.batch_size == 256 else config.batch_size
    teacher.eval()
    n = len(x_all)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            x = diff_augment(x_all[idx], strategy, generator=generator)
            with training_precision(config.precision, device):
                with torch.no_grad():
                    target = F.softmax(teacher(x).float() / temperature, dim=1)
                log_p = F.log_softmax(model(x).float() / temperature, dim=1)
            per_sample = F.kl_div(log_p, target, reduction="none").sum(1) * temperature**2
            if w_all is not None:
                per_sample = per_sample * w_all[idx]
            loss = per_sample.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        if progress is not None and epoch % 10 == 0:
            progress("train", epoch / epochs)
    return model


def _normalised_weights(distilled: DistilledSet) -> torch.Tensor | None:
    if distilled.weights is None:
        return None
    weights = distilled.weights.clamp_min(0)
    if float(weights.sum()) <= 0:
        raise DistillError("archive weights sum to zero")
    return weights / weights.mean()


def evaluate_distilled(
    distilled: DistilledSet,
    dataset: Dataset,
    config: EvalConfig,
    progress: Progress | None = None,
) -> EvalResult:
    if config.protocol not in PROTOCOLS:
        raise DistillError(f"unknown protocol '{config.protocol}'; known: {', '.join(PROTOCOLS)}")
    if config.runs < 1:
        raise DistillError("--runs must be >= 1")
    if config.epochs is not None and config.epochs < 1:
        raise DistillError("--epochs must be >= 1")
    expected = (dataset.channels, dataset.image_size, dataset.image_size)
    if tuple(distilled.images.shape[1:]) != expected:
        raise DistillError(f"archive images are {tuple(distilled.images.shape[1:])}, {dataset.name} needs {expected}")
    start = time.perf_counter()
    device = torch.device(config.device)
    indices = _test_indices(dataset, config.test_limit, config.seed)
    weights = _normalised_weights(distilled)
    teacher = None
    if config.protocol == "softlabel":
        teacher = get_teacher(dataset, config, progress=progress).to(device)
        lr = config.lr or 1e-3
    else:
        lr = config.lr or distilled.learned_lr or 0.01
    soft = F.softmax(distilled.soft_labels, dim=1) if distilled.soft_labels is not None else None
    accuracies = []
    for run in range(config.runs):
        run_seed = config.seed * 1000 + run

        def run_progress(stage: str, fraction: float, run: int = run) -> None:
            if progress is not None:
                progress(stage, (run + fraction) / config.runs)

        if teacher is not None:
            model = train_student_softlabel(distilled.images, dataset, config, run_seed, teacher, weights=weights,
                                            lr=lr, progress=run_progress)
        else:
            model = train_student_dc(distilled.images, distilled.labels, dataset, config, run_seed,
                                     soft_targets=soft, weights=weights, lr=lr, progress=run_progress)
        accuracies.append(test_accuracy(model, dataset, device, indices, precision=config.precision))
    return EvalResult(
        dataset=dataset.name,
        model=config.model,
        protocol=config.protocol,
        epochs=config.resolved_epochs(),
        runs=config.runs,
        accuracies=accuracies,
        lr=lr,
        wall_seconds=round(time.perf_counter() - start, 2),
        test_images=len(indices),
        train_images=len(distilled),
        settings={k: v for k, v in asdict(config).items() if k not in ("runs", "epochs", "model", "protocol")},
    )


# ----------------------------------------------------------------------------------- full data / teacher
def train_on_split(
    dataset: Dataset,
    model_name: str,
    epochs: int,
    seed: int,
    device: torch.device,
    *,
    max_per_class: int | None = None,
    batch_size: int = 256,
    lr: float = 0.01,
    augment: bool = True,
    progress: Progress | None = None,
    precision: str = "auto",
) -> Classifier:
    """Train on the (optionally capped) full training split with the DC optimiser, streaming batches.

    Data parallel under ``accelerate launch`` / ``torchrun`` (several processes): each process takes its
    strided share of every global batch and accelerate's DDP averages the gradients, so the global batch, the
    schedule and the result do not depend on the process count. One process (CPU, one GPU): plain training.
    """
    from accelerate import PartialState

    state = PartialState(cpu=device.type == "cpu")
    rank, world = state.process_index, state.num_processes
    if world > 1:
        device = state.device
    rng = np.random.default_rng(seed)
    indices = np.arange(len(dataset.train))
    if max_per_class is not None:
        indices = np.sort(sample_per_class(dataset.train.labels, dataset.num_classes, max_per_class, rng,
                                           draw_small_classes=True))
    model = build_network(model_name, dataset.channels, dataset.num_classes, dataset.image_size, seed=seed).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    trained: nn.Module = model
    if world > 1:
        from accelerate import Accelerator

        trained, optimizer = Accelerator(cpu=device.type == "cpu", device_placement=False).prepare(model, optimizer)
    steps_per_epoch = math.ceil(len(indices) / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr * 5, total_steps=epochs * steps_per_epoch)
    strategy = strategy_for(dataset.digits) if augment else "none"
    generator = torch.Generator().manual_seed(seed)
    labels_all = torch.from_numpy(dataset.train.labels)
    for epoch in range(epochs):
        model.train()
        order = indices[rng.permutation(len(indices))]
        for step, start in enumerate(range(0, len(order), batch_size)):
            chunk = order[start : start + batch_size][rank::world]
            x = dataset.normalize(to_float(dataset.train.load(chunk)).to(device))
            x = diff_augment(x, strategy, generator=generator)
            with training_precision(precision, device):
                loss = F.cross_entropy(trained(x), labels_all[chunk].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if progress is not None and step % 20 == 0:
                progress("train", (epoch + step / steps_per_epoch) / epochs)
    model.eval()
    return model


def evaluate_full(dataset: Dataset, config: EvalConfig, max_per_class: int | None = None,
                  progress: Progress | None = None) -> EvalResult:
    """Whole-dataset upper bound: the same network trained on the full train split."""
    start = time.perf_counter()
    device = torch.device(config.device)
    epochs = config.epochs or 30
    indices = _test_indices(dataset, config.test_limit, config.seed)
    accuracies = []
    for run in range(config.runs):
        model = train_on_split(dataset, config.model, epochs, config.seed * 1000 + run, device,
                               max_per_class=max_per_class, lr=config.lr or 0.01, augment=config.augment != "none",
                               progress=progress, precision=config.precision)
        accuracies.append(test_accuracy(model, dataset, device, indices, precision=config.precision))
    train_images = len(dataset.train) if max_per_class is None else int(
        np.minimum(dataset.train.counts(dataset.num_classes), max_per_class).sum())
    return EvalResult(
        dataset=dataset.name, model=config.model, protocol="full", epochs=epochs, runs=config.runs,
        accuracies=accuracies, lr=config.lr or 0.01, wall_seconds=round(time.perf_counter() - start, 2),
        test_images=len(indices), train_images=train_images,
        settings={"max_per_class": max_per_class, "schedule": "one-cycle SGD", "device": config.device},
    )


def get_teacher(dataset: Dataset, config: EvalConfig, progress: Progress | None = None) -> Classifier:
    """A network trained on the full train split, trained once and cached under DISTILL_HOME/teachers."""
    from safetensors.torch import load_file, save_file

    folder = get_settings().home_dir / "teachers"
    folder.mkdir(parents=True, exist_ok=True)
    cap = f"-cap{config.teacher_max_per_class}" if config.teacher_max_per_class else ""
    stem = dataset.name.replace("/", "_").replace(":", "_")
    bf16 = "-bf16" if precision_dtype(config.precision, torch.device(config.device), cuda_only_auto=True) else ""
    name = f"{stem}-{config.teacher_model}-e{config.teacher_epochs}{cap}-s{config.seed}{bf16}"
    path = folder / f"{name}.safetensors"
    model = build_network(config.teacher_model, dataset.channels, dataset.num_classes, dataset.image_size)
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    trained = train_on_split(dataset, config.teacher_model, config.teacher_epochs, config.seed, torch.device(config.device),
                             max_per_class=config.teacher_max_per_class, progress=progress, precision=config.precision)
    state = {k: v.detach().cpu().contiguous() for k, v in trained.state_dict().items()}
    with atomic_output(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp))
    model.load_state_dict(state)
    return model.eval()
