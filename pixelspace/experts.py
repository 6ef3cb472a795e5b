"""Expert trajectories for trajectory matching (MTT, DATM): train once, store, reuse across jobs.

An expert is a ConvNet trained from scratch on the real training split with the reference's settings
(mtt-distillation ``buffer.py``: SGD lr 0.01, momentum 0, no weight decay, batch 256, DSA augmentation
applied per sample). Its parameters are snapshotted before training and after every epoch. Each snapshot is
a flat float32 vector (``torch.cat`` of the parameters, i.e. a *copy*): the reference's
``p.detach().cpu()`` aliases the live parameters on CPU, which makes every epoch of a CPU-trained trajectory
identical (see docs/REFERENCE-TIMINGS.md), so we never keep views.

Layout under ``get_settings().home_dir / "experts" / <key>/``: ``expert_000.safetensors`` (one tensor
``trajectory`` of shape (epochs + 1) x num_params per expert), and ``manifest.json`` (settings, parameter
names and shapes, per-expert test accuracy). Every file is written to a temporary name then renamed; an
advisory lock keeps two jobs from training the same buffer at once. A buffer with fewer experts than asked
for is extended, never retrained.
"""

from __future__ import annotations

import fcntl
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from distill.augment import diff_augment, strategy_for
from distill.config import get_settings
from distill.data.registry import Dataset, Split, to_float
from distill.errors import DistillError
from distill.files import atomic_output, atomic_write_json
from distill.nets import build_network

BUFFER_VERSION = 1


# ----------------------------------------------------------------------------------------- flat params
class FlatModel:
    """A network evaluated from one flat parameter vector (what mtt's ``ReparamModule`` does), via
    ``torch.func.functional_call``: the unrolled student steps differentiate through plain tensors."""

    def __init__(self, net: nn.Module, channels_last: bool = True):
        self.net = net
        # NHWC inputs: oneDNN's channels-last kernels for the forward, backward and double backward of the
        # unroll. Measured 30-45 % less CPU time per MTT step on one (loaded) host, neutral on a quiet
        # AVX512 host in fp32 and about 5 % faster there with the bf16 student (docs/BENCHMARKS.md).
        self.channels_last = channels_last
        named = list(net.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.num_params = int(sum(self.numels))

    def flatten(self) -> torch.Tensor:
        """The module's current parameters as a fresh flat vector (a copy, never a view)."""
        return torch.cat([p.detach().reshape(-1) for p in self.net.parameters()]).clone()

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.numels), self.shapes, strict=True)}

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return functional_call(self.net, self.unflatten(flat), (x,))


# ----------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ExpertSettings:
    """Everything that changes a trajectory; it names the buffer folder and is stored in its manifest."""

    dataset: str
    model: str = "convnet"
    epochs: int = 50
    lr_teacher: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_train: int = 256
    augment: bool = True
    max_per_class: int | None = None
    seed: int = 0

    def key(self) -> str:
        safe = self.dataset.replace("/", "_").replace(":", "_")[:60]
        cap = f"cap{self.max_per_class}" if self.max_per_class else "full"
        aug = "dsa" if self.augment else "noaug"
        return (f"{safe}-{self.model}-e{self.epochs}-lr{self.lr_teacher:g}-m{self.momentum:g}-wd{self.weight_decay:g}"
                f"-b{self.batch_train}-{aug}-{cap}-s{self.seed}")

    def validate(self) -> None:
        if self.epochs < 1:
            raise DistillError(f"expert epochs must be >= 1 (got {self.epochs})")
        if self.lr_teacher <= 0:
            raise DistillError(f"lr_teacher must be > 0 (got {self.lr_teacher})")
        if self.batch_train < 1:
            raise DistillError(f"batch_train must be >= 1 (got {self.batch_train})")
        if self.max_per_class is not None and self.max_per_class < 1:
            raise DistillError("--max-per-class must be >= 1")


def buffers_root() -> Path:
    path = get_settings().home_dir / "experts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def buffer_dir(settings: ExpertSettings) -> Path:
    return buffers_root() / settings.key()


# ----------------------------------------------------------------------------------------- the buffer
class ExpertBuffer:
    """A stored set of expert trajectories; trajectories load lazily and stay cached."""

    def __init__(self, folder: Path):
        manifest_path = folder / "manifest.json"
        if not manifest_path.exists():
            raise DistillError(f"no expert buffer at {folder} (missing manifest.json)")
        self.folder = folder
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if self.manifest.get("version") != BUFFER_VERSION:
            raise DistillError(f"{folder}: unsupported expert buffer version {self.manifest.get('version')}")
        self.settings = ExpertSettings(**self.manifest["settings"])
        self.names: list[str] = self.manifest["param_names"]
        self.shapes: list[tuple[int, ...]] = [tuple(s) for s in self.manifest["param_shapes"]]
        self.num_params: int = int(self.manifest["num_params"])
        self._cache: dict[int, torch.Tensor] = {}
        self.max_cached = 10  # whole trajectories kept in memory (the reference streams files of 10 experts)

    @property
    def num_experts(self) -> int:
        return len(self.manifest["experts"])

    @property
    def epochs(self) -> int:
        return self.settings.epochs

    def trajectory(self, index: int) -> torch.Tensor:
        """(epochs + 1) x num_params float32 tensor of expert ``index``."""
        if not 0 <= index < self.num_experts:
            raise DistillError(f"expert {index} not in buffer ({self.num_experts} experts)")
        if index not in self._cache:
            if len(self._cache) >= self.max_cached:
                self._cache.pop(next(iter(self._cache)))
            entry = self.manifest["experts"][index]
            tensor = load_file(str(self.folder / entry["file"]))["trajectory"]
            if tensor.shape != (self.epochs + 1, self.num_params):
                raise DistillError(f"{entry['file']}: trajectory shape {tuple(tensor.shape)} does not match the manifest")
            self._cache[index] = tensor
        return self._cache[index]

    def snapshot(self, index: int, epoch: int) -> torch.Tensor:
        """One flat snapshot; read on its own (not the whole trajectory) unless the trajectory is cached,
        so a 100-expert buffer never has to fit in memory."""
        if index in self._cache:
            return self._cache[index][epoch]
        if not 0 <= index < self.num_experts:
            raise DistillError(f"expert {index} not in buffer ({self.num_experts} experts)")
        if not 0 <= epoch <= self.epochs:
            raise DistillError(f"epoch {epoch} not in trajectory (0..{self.epochs})")
        with safe_open(str(self.folder / self.manifest["experts"][index]["file"]), framework="pt") as handle:
            return handle.get_slice("trajectory")[epoch : epoch + 1][0].clone()

    def build_net(self, dataset: Dataset) -> nn.Module:
        """A network with this buffer's architecture (weights are whatever the snapshot loads)."""
        net = build_network(self.settings.model, dataset.channels, dataset.num_classes, dataset.image_size, seed=0)
        names = [n for n, _ in net.named_parameters()]
        if names != self.names:
            raise DistillError(f"expert buffer {self.folder.name} does not match network {self.settings.model}")
        return net

    def load_into(self, net: nn.Module, index: int, epoch: int) -> nn.Module:
        flat = self.snapshot(index, epoch)
        params = FlatModel(net).unflatten(flat)
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(params[name])
        return net


def load_buffer(folder: Path | str) -> ExpertBuffer:
    return ExpertBuffer(Path(folder))


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------- training
def _test_subset(dataset: Dataset, limit: int, seed: int) -> np.ndarray:
    labels = dataset.test.labels
    if limit >= len(labels):
        return np.arange(len(labels))
    return np.sort(np.random.default_rng(seed).choice(len(labels), size=limit, replace=False))


@torch.no_grad()
def _accuracy(net: nn.Module, dataset: Dataset, indices: np.ndarray, device: torch.device) -> float:
    net.eval()
    correct = 0
    for chunk, images in dataset.test.batches(500, indices):
        pred = net(dataset.normalize(to_float(images).to(device))).argmax(1).cpu()
        correct += int((pred == torch.from_numpy(dataset.test.labels[chunk])).sum())
    net.train()
    return 100.0 * correct / max(1, len(indices))


def train_expert(
    dataset: Dataset,
    train: Split,
    settings: ExpertSettings,
    expert_index: int,
    device: torch.device,
    *,
    tick: Callable[[], None] | None = None,
    check_cancelled: Callable[[], None] | None = None,
    test_limit: int = 1000,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One trajectory: (epochs + 1) x P cloned snapshots, plus its final test accuracy (for the manifest).

    ``tick`` is called after every epoch (progress); ``check_cancelled`` before every batch and before the test
    pass (it raises to stop, and must be cheap: a flag read), so a cancel stops training within one batch
    instead of one epoch."""
    seed = settings.seed * 100_003 + expert_index
    net = build_network(settings.model, dataset.channels, dataset.num_classes, dataset.image_size, seed=seed).to(device)
    flat = FlatModel(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=settings.lr_teacher, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    strategy = strategy_for(dataset.digits) if settings.augment else "none"
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    labels_all = torch.from_numpy(np.asarray(train.labels))
    snapshots = torch.empty(settings.epochs + 1, flat.num_params)
    snapshots[0] = flat.flatten().cpu()
    start = time.perf_counter()
    net.train()
    for epoch in range(settings.epochs):
        order = rng.permutation(len(train))
        for chunk, images in train.batches(settings.batch_train, order):
            if check_cancelled is not None:
                check_cancelled()
            x = dataset.normalize(to_float(images).to(device))
            x = diff_augment(x, strategy, generator=generator).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(net(x), labels_all[chunk].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        snapshots[epoch + 1] = flat.flatten().cpu()  # a copy: torch.cat never aliases
        if tick is not None:
            tick()
    if check_cancelled is not None:
        check_cancelled()
    info = {
        "test_accuracy": round(_accuracy(net, dataset, _test_subset(dataset, test_limit, seed), device), 3),
        "test_images": min(test_limit, len(dataset.test)),
        "seconds": round(time.perf_counter() - start, 2),
        "seed": seed,
    }
    return snapshots, info


def ensure_buffer(
    dataset: Dataset,
    train: Split,
    settings: ExpertSettings,
    experts: int,
    device: torch.device | str = "cpu",
    *,
    log: Callable[[str], None] = lambda message: None,
    tick: Callable[[], None] | None = None,
    check_cancelled: Callable[[], None] = lambda: None,
) -> ExpertBuffer:
    """The buffer for ``settings`` with at least ``experts`` trajectories, training the missing ones.

    ``tick`` is called once per trained epoch (``experts_to_train(...) * epochs`` calls in all), so callers
    can drive a progress bar; ``check_cancelled`` before every expert and every training batch (it raises to
    stop: the expert in training is dropped, the finished ones stay in the buffer). ``train`` must already
    respect ``settings.max_per_class``.
    """
    settings.validate()
    if experts < 1:
        raise DistillError(f"--experts must be >= 1 (got {experts})")
    device = torch.device(device)
    folder = buffer_dir(settings)
    with _locked(folder):
        manifest_path = folder / "manifest.json"
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
        else:
            net = build_network(settings.model, dataset.channels, dataset.num_classes, dataset.image_size, seed=0)
            flat = FlatModel(net)
            manifest = {
                "version": BUFFER_VERSION,
                "settings": asdict(settings),
                "dataset": dataset.describe() | {"train_images_used": len(train)},
                "param_names": flat.names,
                "param_shapes": [list(s) for s in flat.shapes],
                "num_params": flat.num_params,
                "strategy": strategy_for(dataset.digits) if settings.augment else "none",
                "experts": [],
            }
            atomic_write_json(manifest_path, manifest, indent=2)
        have = len(manifest["experts"])
        if have < experts:
            log(f"training {experts - have} expert(s) x {settings.epochs} epochs into {folder}")
        for index in range(have, experts):
            check_cancelled()
            trajectory, info = train_expert(dataset, train, settings, index, device, tick=tick,
                                           check_cancelled=check_cancelled)
            name = f"expert_{index:03d}.safetensors"
            with atomic_output(folder / name, suffix=".safetensors") as tmp:
                save_file({"trajectory": trajectory.contiguous()}, str(tmp))
            manifest["experts"].append({"file": name, **info})
            atomic_write_json(manifest_path, manifest, indent=2)
            log(f"expert {index}: test accuracy {info['test_accuracy']:.2f}% after {settings.epochs} epochs "
                f"({info['seconds']:.0f} s)")
    return ExpertBuffer(folder)


def experts_to_train(settings: ExpertSettings, experts: int) -> int:
    """How many experts ``ensure_buffer`` would train now (for progress totals)."""
    manifest_path = buffer_dir(settings) / "manifest.json"
    if not manifest_path.exists():
        return experts
    return max(0, experts - len(json.loads(manifest_path.read_text())["experts"]))


def list_buffers() -> list[dict[str, Any]]:
    out = []
    for manifest_path in sorted(buffers_root().glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        accs = [e["test_accuracy"] for e in manifest["experts"]]
        out.append({
            "path": str(manifest_path.parent),
            "experts": len(manifest["experts"]),
            **manifest["settings"],
            "mean_test_accuracy": round(sum(accs) / len(accs), 2) if accs else math.nan,
        })
    return out
