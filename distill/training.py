"""What every training loop of the core shares: the network ``auto`` picks, batch sizes from a memory budget,
the budget from the device, the network's memory layout on the device, the autocast context, and data
parallelism (process rank, the DistributedDataParallel wrapper, the end of a run).

The students (:mod:`distill.evaluate`) and the teacher (:mod:`distill.teacher`) both train with these, so they
live below both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from distill.precision import autocast_context, precision_dtype

Progress = Callable[[str, float], None]
CancelCheck = Callable[[], None]  # raises (distill.errors.Cancelled) to stop a run; called between steps
M = TypeVar("M", bound=nn.Module)

RESNET_FROM_SIZE = 128  # model="auto": ResNet-18 from this resolution on (DDOQ/RDED on ImageNet), ConvNet below
DEFAULT_MEMORY_GB = 2.0  # activation budget of one pass on the CPU (host memory is shared with everything else)
CUDA_FREE_FRACTION = 0.5  # share of the device's free memory one pass may use (allocator slack, the optimiser)


def resolve_model(name: str, image_size: int) -> str:
    """``auto`` -> convnet below 128 px, resnet18 at 128 px and above; other names as given."""
    if name != "auto":
        return name
    return "resnet18" if image_size >= RESNET_FROM_SIZE else "convnet"


def activation_bytes(model: str, channels: int, image_size: int, train: bool) -> int:
    """Rough activation memory of one image through ``model`` (float32): the first feature map dominates
    (ConvNet: width 128 at full resolution, ~3 maps live; ResNet-18: 64 maps at half or full resolution, ~10
    live); training keeps every layer's output for backward (x4). Used only to size batches."""
    name = resolve_model(model, image_size)
    if name.startswith("resnet"):
        side = image_size // 4 if image_size >= 64 else image_size
        per = 64 * side * side * 4 * 10
    else:
        per = 128 * image_size * image_size * 4 * 3
    return per * (4 if train else 1) + channels * image_size * image_size * 4


def batch_for(budget_gb: float, per_image: int, cap: int) -> int:
    """The largest batch up to ``cap`` whose activations (``per_image`` bytes each) fit ``budget_gb``."""
    return int(max(1, min(cap, (budget_gb * 2**30) // max(1, per_image))))


def memory_budget_gb(device: torch.device, requested: float | None = None,
                     free_bytes: Callable[[torch.device], int] | None = None) -> float:
    """The activation budget of one forward/backward pass on ``device``, in GiB.

    ``requested`` (the user's ``memory_gb``) wins. Otherwise the CPU gets :data:`DEFAULT_MEMORY_GB`, and a CUDA
    device :data:`CUDA_FREE_FRACTION` of its free memory now: a fixed CPU-sized budget would cut a GPU's
    batches into micro-batches it does not need. ``free_bytes`` replaces ``torch.cuda.mem_get_info`` (tests)."""
    if requested is not None:
        return float(requested)
    if device.type != "cuda":
        return DEFAULT_MEMORY_GB
    if free_bytes is None:
        return CUDA_FREE_FRACTION * torch.cuda.mem_get_info(device)[0] / 2**30
    return CUDA_FREE_FRACTION * free_bytes(device) / 2**30


def on_device(model: M, device: torch.device) -> M:
    """``model`` on ``device``; a convolutional network on CUDA in channels_last, the layout tensor cores run
    convolutions in (the weights' layout carries to the activations). Not on the CPU, where it brought no gain."""
    model = model.to(device)
    if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def training_precision(precision: str, device: torch.device):
    """The autocast context of a forward pass under ``EvalConfig.precision`` (the soft-label teacher's labels;
    students, teachers and tests run through :mod:`distill.fastpath`)."""
    return autocast_context(device, precision_dtype(precision, device, "--precision"))


def data_parallel(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process: under ``accelerate launch`` / ``torchrun`` each of the
    ``world`` processes takes a share of every batch; one process (CPU, one GPU) is rank 0 of 1."""
    from accelerate import PartialState

    state = PartialState(cpu=device.type == "cpu")
    if state.num_processes > 1:
        return state.process_index, state.num_processes, state.device
    return 0, 1, device


def wrap_data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` over the process group accelerate's
    process state set up (:func:`data_parallel`; gloo on the CPU, nccl on CUDA): backward all-reduces the
    gradients in buckets and averages them over the processes. ``model`` keeps its parameters, so an optimiser
    made on it updates the trained weights.

    BatchNorm: on CUDA the batch-norm layers become :class:`~torch.nn.SyncBatchNorm` first (in place; batch
    statistics over every process's share, as one process would see the batch; :func:`end_data_parallel` turns
    them back). torch has no SyncBatchNorm on the CPU, so with gloo each process normalises with its own share's
    statistics and DDP hands rank 0's running statistics to every process at each forward: a batch-norm network
    then trains differently from one process. Instance / group / layer norm networks (the ConvNet) are unaffected."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if converted is not model:  # a bare BatchNorm layer as the whole network: not one of ours
            raise TypeError("wrap_data_parallel needs a network that contains its batch-norm layers")
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def end_data_parallel(model: M) -> M:
    """After data-parallel training (several processes): rank 0's buffers (batch-norm running statistics) in
    every process, so that each process tests or labels with the same network, and SyncBatchNorm layers back to
    BatchNorm2d (the networks here use 2-d batch norm), so the trained network is a plain module. One process:
    ``model`` as it is."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return model
    if torch.distributed.get_world_size() == 1:
        return model
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer, 0)
    _plain_batchnorm(model)
    return model


def _plain_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            plain = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            if child.affine:
                plain.weight, plain.bias = child.weight, child.bias
            plain.running_mean, plain.running_var = child.running_mean, child.running_var
            plain.num_batches_tracked = child.num_batches_tracked
            plain.train(child.training)
            setattr(module, name, plain)
        else:
            _plain_batchnorm(child)


def smallest_over_processes(value: int, device: torch.device) -> int:
    """The smallest ``value`` any process has (several processes; every one must call it): e.g. a micro-batch
    size from a memory budget that differs between GPUs, so that every process splits batches the same way."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
    return int(tensor.item())


def finish_data_parallel() -> bool:
    """End of a data-parallel run: wait for every process and close the process group (a gloo group left open
    can abort the interpreter at exit); True in the process that reports (rank 0, or the only one)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return True
    rank = torch.distributed.get_rank()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return rank == 0
