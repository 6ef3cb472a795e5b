"""Networks trained on a dataset's real training split: the evaluation's upper bound (``distill eval --full``)
and the teacher that soft-label evaluation, ``herding``/``kcenter`` with ``features=teacher``, ``dq`` and
``labels=teacher`` use.

A teacher is trained once per (dataset, network, epochs, cap, seed, precision) and cached under
``DISTILL_HOME/teachers``; an operator can give a local torchvision-format ResNet-18 checkpoint instead.
Training reads its batches through the streaming loader (:class:`distill.data.loader.ImageStream`), so an
on-disk dataset is decoded in worker processes ahead of the step rather than one file at a time in the
training thread; it reports progress as one stage and checks for cancellation before every step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from distill.augment import BatchRows, diff_augment, strategy_for
from distill.config import get_settings
from distill.data.loader import ImageStream
from distill.data.registry import Dataset, to_float
from distill.data.sampling import run_sample, sample_per_class
from distill.fastpath import FastPath, compile_wanted, prepare, run_work
from distill.files import atomic_output
from distill.nets import Classifier, build_network
from distill.precision import precision_dtype
from distill.training import (
    CancelCheck,
    Progress,
    data_parallel,
    end_data_parallel,
    on_device,
    resolve_model,
)

PROGRESS_SECONDS = 0.5  # the longest gap between two progress reports within an epoch


@dataclass(frozen=True)
class TeacherSpec:
    """Which teacher: everything that changes its weights (``device`` only says where it runs)."""

    model: str = "auto"  # auto: convnet below 128 px, resnet18 from 128 px
    epochs: int = 15
    max_per_class: int | None = None  # train on at most this many images per class (seeded draw)
    # with max_per_class: True = exactly the images a method run with this seed and cap sees (run_train_split),
    # so a method's teacher adds no image the run may not see; False = the evaluation's own draw
    run_sample: bool = False
    seed: int = 0
    precision: str = "auto"
    compile: str = "auto"  # torch.compile of the training (distill.fastpath); not in the cache key: same arithmetic
    device: str = "cpu"
    checkpoint: str | None = None  # a local torchvision-format ResNet-18 state dict (.pth / .safetensors)


def training_indices(dataset: Dataset, max_per_class: int | None, rng: np.random.Generator, seed: int,
                     run_sample_only: bool = False) -> np.ndarray:
    """The training split's rows a full-split trainer sees: all, or ``max_per_class`` per class (the run's own
    sample with ``run_sample_only``, else a draw from ``rng``)."""
    if max_per_class is None:
        return np.arange(len(dataset.train))
    if run_sample_only:
        return run_sample(dataset, max_per_class, seed)
    return np.sort(sample_per_class(dataset.train.labels, dataset.num_classes, max_per_class, rng,
                                    draw_small_classes=True))


def epoch_batches(dataset: Dataset, steps: list[np.ndarray], device: torch.device,
                  num_workers: int | None) -> Iterator[tuple[np.ndarray, torch.Tensor | None]]:
    """One epoch's batches, one per optimiser step and in step order: (indices decoded, uint8 images), or
    (empty, None) for a step where this process has no share. Files that cannot be decoded are left out."""
    stream = iter(ImageStream(dataset.train, batches=steps, device=device, num_workers=num_workers))
    for chunk in steps:
        if len(chunk) == 0:
            yield chunk, None
        else:
            yield next(stream)


def train_on_split(
    dataset: Dataset,
    model_name: str,
    epochs: int,
    seed: int,
    device: torch.device,
    *,
    max_per_class: int | None = None,
    run_sample_only: bool = False,
    batch_size: int = 256,
    lr: float = 0.01,
    augment: bool = True,
    progress: Progress | None = None,
    precision: str = "auto",
    compile: str | bool = "auto",
    check_cancelled: CancelCheck | None = None,
    stage: str = "train",
    num_workers: int | None = None,
) -> Classifier:
    """Train on the (optionally capped) full training split: SGD momentum 0.9, one-cycle schedule, DSA
    augmentation, on at most ``max_per_class`` images per class (``run_sample_only``: exactly the sample a method run
    with this seed sees); ``progress(stage, fraction)`` at every epoch's end and every few tenths of a second,
    ``check_cancelled()`` (it raises to stop) before every step.

    Data parallel under ``accelerate launch`` / ``torchrun`` (several processes, accelerate's process state):
    the network runs in DistributedDataParallel (:func:`distill.training.wrap_data_parallel`, which also says
    how BatchNorm behaves); each process takes its strided share of every global batch, augments each image as
    one process would (the parameters are drawn for the whole batch, :class:`distill.augment.BatchRows`) and
    weights its loss so that DDP's average of the gradients is the one-process gradient of the whole batch; a
    process whose share is empty runs an empty batch to take part in the reduction. The global batch, the
    schedule and the result do not depend on the process count. One process (CPU, one GPU): plain training.
    """
    rank, world, device = data_parallel(device)
    rng = np.random.default_rng(seed)
    indices = training_indices(dataset, max_per_class, rng, seed, run_sample_only)
    model_name = resolve_model(model_name, dataset.image_size)
    model = on_device(build_network(model_name, dataset.channels, dataset.num_classes, dataset.image_size, seed=seed),
                      device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    steps_per_epoch = math.ceil(len(indices) / batch_size)
    fast = prepare(model, device, precision, compile_wanted(compile, device, run_work(
        epochs * steps_per_epoch, min(batch_size, len(indices)), dataset.image_size), model), "auto",
        data_parallel=world > 1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr * 5, total_steps=epochs * steps_per_epoch)
    strategy = strategy_for(dataset.digits) if augment else "none"
    generator = torch.Generator().manual_seed(seed)
    labels_all = torch.from_numpy(dataset.train.labels)
    last_report = time.monotonic()
    if progress is not None:
        progress(stage, 0.0)
    for epoch in range(epochs):
        model.train()
        order = indices[rng.permutation(len(indices))]
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        shares = [batch[rank::world] for batch in batches]  # a share of the last batch can be empty
        for step, (chunk, images) in enumerate(epoch_batches(dataset, shares, device, num_workers)):
            if check_cancelled is not None:
                check_cancelled()
            optimizer.zero_grad(set_to_none=True)
            if world > 1:
                _data_parallel_backward(fast, dataset, chunk, images, batches[step], shares[step], rank, world,
                                        strategy, generator, labels_all)
            elif images is not None and len(chunk):
                x = dataset.normalize(to_float(images.to(device, non_blocking=True)))
                x = diff_augment(x, strategy, generator=generator)
                loss = F.cross_entropy(fast.logits(x), labels_all[chunk].to(device))
                (loss * (len(chunk) / len(batches[step]))).backward()
            optimizer.step()
            scheduler.step()
            if progress is not None and time.monotonic() - last_report >= PROGRESS_SECONDS:
                last_report = time.monotonic()
                progress(stage, (epoch + (step + 1) / steps_per_epoch) / epochs)
        if progress is not None:
            last_report = time.monotonic()
            progress(stage, (epoch + 1) / epochs)
    if world > 1:
        end_data_parallel(model)
    model.eval()
    return model


def _data_parallel_backward(fast: FastPath, dataset: Dataset, chunk: np.ndarray, images: torch.Tensor | None,
                            batch: np.ndarray, share: np.ndarray, rank: int, world: int, strategy: str,
                            generator: torch.Generator, labels_all: torch.Tensor) -> None:
    """One process's backward of a global ``batch`` under DDP: its decoded ``chunk`` of its ``share``
    (``batch[rank::world]``), augmented with the parameters drawn for the whole batch, the summed loss weighted
    by ``world / len(batch)`` (DDP averages over processes); an empty share runs an empty batch."""
    device = fast.device
    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    positions = rank + world * np.flatnonzero(np.isin(share, chunk))  # files that failed to decode are left out
    rows = BatchRows(len(batch), torch.from_numpy(positions).long())
    if images is None or len(chunk) == 0:
        diff_augment(torch.zeros((0, *shape), device=device), strategy, generator=generator, rows=rows)  # in step
        fast.idle_loss(shape).backward()
        return
    x = dataset.normalize(to_float(images.to(device, non_blocking=True)))
    x = diff_augment(x, strategy, generator=generator, rows=rows)
    loss = F.cross_entropy(fast.logits(x), labels_all[chunk].to(device), reduction="sum")
    (loss * (world / len(batch))).backward()


def teacher_path(dataset: Dataset, spec: TeacherSpec) -> Path:
    """Cache file of a trained teacher: its name holds everything in :class:`TeacherSpec` but the device."""
    cap = f"-{'run' if spec.run_sample else 'cap'}{spec.max_per_class}" if spec.max_per_class else ""
    stem = dataset.name.replace("/", "_").replace(":", "_")
    bf16 = "-bf16" if precision_dtype(spec.precision, torch.device(spec.device)) else ""
    model = resolve_model(spec.model, dataset.image_size)
    return get_settings().home_dir / "teachers" / f"{stem}-{model}-e{spec.epochs}{cap}-s{spec.seed}{bf16}.safetensors"


def get_teacher(dataset: Dataset, spec: TeacherSpec, progress: Progress | None = None,
                check_cancelled: CancelCheck | None = None) -> Classifier:
    """The teacher of ``spec`` in eval mode on ``spec.device``: loaded from the cache, or trained on the train
    split (stage ``teacher``) and cached; with ``spec.checkpoint``, the operator's local ResNet-18 checkpoint."""
    from safetensors.torch import load_file, save_file

    device = torch.device(spec.device)
    if spec.checkpoint:
        from distill.nets import load_torchvision_resnet18

        loaded = load_torchvision_resnet18(Path(spec.checkpoint).expanduser(), dataset.channels, dataset.num_classes)
        return on_device(loaded, device).eval()
    path = teacher_path(dataset, spec)
    model_name = resolve_model(spec.model, dataset.image_size)
    model = build_network(model_name, dataset.channels, dataset.num_classes, dataset.image_size)
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        if progress is not None:
            progress("teacher", 1.0)
        return on_device(model, device).eval()
    trained = train_on_split(dataset, model_name, spec.epochs, spec.seed, device, max_per_class=spec.max_per_class,
                             run_sample_only=spec.run_sample, progress=progress, precision=spec.precision,
                             compile=spec.compile, check_cancelled=check_cancelled, stage="teacher")
    state = {k: v.detach().cpu().contiguous() for k, v in trained.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp))
    model.load_state_dict(state)
    return on_device(model, device).eval()
