"""The contract between every distillation method and whoever runs it (CLI, local worker, Ray worker).

A method is a class with a pydantic ``Params`` model (defaults from its paper) and ``run(ctx, params)``
returning a :class:`DistilledSet`. Only the :class:`RunContext` differs between callers: where progress
goes, where checkpoints live, which device is used and how cancellation is signalled.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Generic, Literal, Protocol, TypeVar

import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.json_schema import JsonDict
from pydantic_core import PydanticCustomError

from distill.data.registry import Dataset, Split, as_pixels
from distill.data.sampling import run_train_split
from distill.errors import Cancelled, DistillError
from distill.files import atomic_output

CHECK_SECONDS = 0.5  # RunContext.track: the longest time between two cancellation checks (besides one item)


# Upper bounds of the budget parameters, by name, for every method that has them (a method's Params may
# lower or add bounds in its own ``budget_limits``). Generous for GPU hosts, but finite: a request cannot ask
# for 10**12 iterations. Shown as "maximum" in each method's JSON schema (GET /methods, distill methods --json).
BUDGET_LIMITS: dict[str, int] = {
    "iterations": 1_000_000,
    **dict.fromkeys(("epochs", "teacher_epochs", "expert_train_epochs", "distill_epochs", "decay_epochs",
                     "expert_epochs", "max_start_epoch", "min_start_epoch", "current_max_start_epoch",
                     "expansion_end_epoch", "syn_steps", "distill_steps", "outer_loop", "inner_loop"), 10_000),
    **dict.fromkeys(("experts", "label_experts", "num_bins"), 10_000),
    **dict.fromkeys(("batch_size", "batch_real", "batch_train", "batch_syn", "real_chunk"), 100_000),
    "teacher_max_per_class": 1_000_000,
    "steps": 1000,
    "restarts": 100,
    "km_expand": 64,
    "resolution": 4096,
}


def _document_limits(schema: dict[str, Any], model: type[BaseModel]) -> None:
    limits: dict[str, int] = model.limits() if issubclass(model, MethodParams) else {}
    for name, prop in schema.get("properties", {}).items():
        if name in limits:
            for option in prop.get("anyOf", [prop]):
                if option.get("type") == "integer":
                    option["maximum"] = min(limits[name], option.get("maximum", limits[name]))


TEXT_MAX = 256  # the longest string any parameter takes (free text included); names are shorter
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def paths_allowed(info: ValidationInfo) -> bool:
    """Whether this validation may accept file paths for model parameters: only when the caller says so
    (``context={"paths": True}``: the CLI, whose user owns the machine). HTTP requests, and any validation
    without a context, accept registered names only."""
    return bool(isinstance(info.context, dict) and info.context.get("paths"))


def _grammar(kind: str, pattern: str, explain: str) -> Callable[[str], str]:
    """The validator of a string parameter restricted to a small grammar (network names, augmentation
    strategies): a mismatch is a one-line error saying what is accepted (the pattern is in the JSON schema)."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise PydanticCustomError(kind, "'{value}' is not " + explain, {"value": _shown(value)})
        return value

    return check


def _shown(value: str) -> str:
    """A client's value quoted in an error message: cut short, control characters escaped."""
    text = value[:64].encode("unicode_escape").decode("ascii")
    return text + ("..." if len(value) > 64 else "")


# Errors whose message already quotes the value (registry.param_problems does not repeat it).
QUOTING_ERRORS = ("unknown_network", "unknown_dsa_strategy", "unregistered_model")

# A network of distill.nets.build_network, by name (never a path): convnet with its variant tokens, lenet, resnet18.
NETWORK_PATTERN = r"^(convnet(-(d[1-9]|w[1-9][0-9]{0,3}|bn|in|ln|gn|nn|ap|mp|np))*|lenet|resnet18(-(bn|ap|in))?)$"
NetworkName = Annotated[str, Field(max_length=64, json_schema_extra={"pattern": NETWORK_PATTERN}), AfterValidator(
    _grammar("unknown_network", NETWORK_PATTERN,
             "a network: convnet[-dN][-wN][-bn|in|ln|gn|nn][-ap|mp|np], lenet or resnet18[-bn|-ap|-in]"))]
# Differentiable Siamese augmentation (distill.augment.OPS): auto, none, or op families joined by '_'.
_DSA_OPS = "color|crop|cutout|flip|scale|rotate"
DSA_PATTERN = rf"^(auto|none|({_DSA_OPS})(_({_DSA_OPS}))*)$"
DsaStrategy = Annotated[str, Field(max_length=64, json_schema_extra={"pattern": DSA_PATTERN}), AfterValidator(
    _grammar("unknown_dsa_strategy", DSA_PATTERN,
             "a DSA strategy: auto, none, or families joined by '_' (color, crop, cutout, flip, scale, rotate)"))]


def _allowed_models(builtin: bool) -> list[str]:
    from distill.models import BUILTIN_MODELS, model_names

    return [n for n in model_names() if builtin or n not in BUILTIN_MODELS]


def _model_check(builtin: bool) -> Callable[[str, ValidationInfo], str]:
    def check(value: str, info: ValidationInfo) -> str:
        if paths_allowed(info):
            return value
        names = _allowed_models(builtin)
        if value not in names:
            raise PydanticCustomError("unregistered_model",
                                      "'{value}' is not a model registered on this server; allowed: {allowed}",
                                      {"value": _shown(value), "allowed": ", ".join(names) or "none registered"})
        return value

    return check


def _model_schema(builtin: bool) -> Callable[[JsonDict], None]:
    def schema(json: JsonDict) -> None:
        json["examples"] = list(_allowed_models(builtin))  # what this server accepts over HTTP (GET /models)
        json["x-registered-name"] = True

    return schema


# Parameters naming model weights: over HTTP a model registered on the server (DISTILL_MODELS; ModelName also
# the built-in encoders), from the CLI also a path. The JSON schema lists the names registered when it is
# generated (GET /methods); a run resolves a name to its directory (distill.models.resolve_models).
ModelName = Annotated[str, Field(max_length=TEXT_MAX, json_schema_extra=_model_schema(True)),
                      AfterValidator(_model_check(True))]
RegisteredModel = Annotated[str, Field(max_length=TEXT_MAX, json_schema_extra=_model_schema(False)),
                            AfterValidator(_model_check(False))]


# Parameters that only have an effect on one kind of device say so in their JSON schema ("x-device"):
# ``Field(..., json_schema_extra=only_on("cuda"))``. They validate on every host like any other parameter;
# GET /methods, the web form and `distill methods NAME` set them apart on a host without that device.
DEVICE_KEY = "x-device"
DEVICE_NAMES = {"cuda": "a CUDA GPU"}  # the devices a parameter may name, as a sentence says them


def only_on(device: Literal["cuda"]) -> JsonDict:
    """The ``json_schema_extra`` of a parameter that only has an effect on ``device``."""
    return {DEVICE_KEY: device}


def device_parameters(schema: dict[str, Any]) -> dict[str, str]:
    """The parameters of a ``Params`` JSON schema marked with :func:`only_on`, each with its device."""
    return {name: prop[DEVICE_KEY] for name, prop in schema.get("properties", {}).items() if DEVICE_KEY in prop}


def host_has(device: str) -> bool:
    """Whether this host has ``device`` (a name of :data:`DEVICE_NAMES`)."""
    return device == "cuda" and torch.cuda.is_available()


class MethodParams(BaseModel):
    """Base for each method's parameters. Unknown keys are rejected; ``iterations`` is the budget knob. Every
    budget parameter has an upper bound (:data:`BUDGET_LIMITS`, ``budget_limits``), floats must be finite.

    Types are strict (an integer is not ``"100"`` or ``true``): a client's JSON is taken as typed, and the CLI's
    ``--set`` strings are converted by validating with ``strict=False``. Every string parameter is an enum
    (``Literal``), a name of a small grammar (:data:`NetworkName`, :data:`DsaStrategy`) or a registered model
    (:func:`model_name`); none is longer than :data:`TEXT_MAX` or holds control characters (NUL included).
    """

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, allow_inf_nan=False,
                              str_max_length=TEXT_MAX, json_schema_extra=_document_limits)
    budget_limits: ClassVar[dict[str, int]] = {}

    @classmethod
    def limits(cls) -> dict[str, int]:
        return {**BUDGET_LIMITS, **cls.budget_limits}

    @field_validator("*", mode="before")
    @classmethod
    def _plain_text(cls, value: Any) -> Any:
        if isinstance(value, str) and CONTROL.search(value):
            raise PydanticCustomError("control_character", "text must not contain control characters (NUL included)")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _within_budget(cls, value: Any, info: ValidationInfo) -> Any:
        limit = cls.limits().get(info.field_name or "")
        if limit is not None and isinstance(value, int) and not isinstance(value, bool) and value > limit:
            raise PydanticCustomError("less_than_equal", "Input should be less than or equal to {le}", {"le": limit})
        return value


def usable_learned_lr(value: float) -> bool:
    """A learned student lr evaluation can train with: positive and finite (trajectory matching lets it cross
    zero, and SGD refuses a negative lr)."""
    return math.isfinite(value) and value > 0


@dataclass
class DistilledSet:
    """What a method produces.

    images: float N x C x H x W in pixel scale ([0, 1] nominal; values outside are kept exactly), or uint8
        N x C x H x W (0-255) for methods whose images are 8-bit anyway (decoded latents): a quarter of the
        memory and archive bytes. ``pixels()`` gives float [0, 1] either way.
    labels: int64 N hard labels: the class each image stands for (always present, also with soft labels).
    soft_labels: optional float N x num_classes *logits* (students use softmax of them).
    weights: optional float N per-image weights (e.g. cluster masses, summing to 1 per class).
    learned_lr: optional learning rate learned with the set (DD, MTT, DATM); evaluation uses it.
    extras: further tensors saved in the archive; metrics: JSON-able numbers for the manifest.
    """

    images: torch.Tensor
    labels: torch.Tensor
    soft_labels: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    learned_lr: float | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        images = self.images.detach().cpu()
        self.images = (images if images.dtype == torch.uint8 else images.float()).contiguous()
        self.labels = self.labels.detach().long().cpu().contiguous()
        n = len(self.images)
        if len(self.labels) != n:
            raise ValueError(f"{n} images but {len(self.labels)} labels")
        if self.soft_labels is not None:
            self.soft_labels = self.soft_labels.detach().float().cpu().contiguous()
            if len(self.soft_labels) != n:
                raise ValueError("soft_labels must have one row per image")
        if self.weights is not None:
            self.weights = self.weights.detach().float().cpu().contiguous()
            if self.weights.shape != (n,):
                raise ValueError("weights must be a vector with one entry per image")
        self.extras = {k: v.detach().cpu().contiguous() for k, v in self.extras.items()}

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self, index: slice | torch.Tensor | None = None) -> torch.Tensor:
        """Float pixel-scale images (all, or ``images[index]``): uint8 storage is divided by 255 here."""
        return as_pixels(self.images if index is None else self.images[index])


class ProgressSink(Protocol):
    def __call__(self, stage: str, fraction: float, message: str | None = None) -> None: ...


class Executor(Protocol):
    """A fan-out engine for heavy stages (encode shards, per-class k-means): results come back in item order.

    ``fn`` must be picklable (an engine may run it in other processes or hosts); ``num_gpus`` None means the
    engine's default. Results stream back as they finish: ``on_result(index, result)`` is called for each at
    once (progress), and ``check_cancelled`` between waits (it raises ``Cancelled``; the engine then stops the
    outstanding items). ``device`` is what items should run on ("auto": each picks the device the engine gave
    it). The job layer's Ray executor implements it; without one a method runs in-process.
    """

    device: str

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], *, num_gpus: float | None = None,
            num_cpus: float = 1.0, on_result: Callable[[int, Any], None] | None = None,
            check_cancelled: Callable[[], None] | None = None) -> list: ...


def map_in_process(fn: Callable[[Any], Any], items: Iterable[Any], *,
                   on_result: Callable[[int, Any], None] | None = None,
                   check_cancelled: Callable[[], None] | None = None) -> list:
    """:meth:`Executor.map` in this process, item by item: the engine for inline runs (and tests)."""
    results: list[Any] = []
    for i, item in enumerate(items):
        if check_cancelled is not None:
            check_cancelled()
        results.append(fn(item))
        if on_result is not None:
            on_result(i, results[-1])
    return results


class Resumable(Protocol):
    """The state of an iterative method that a checkpoint saves and a resumed run loads (torch.save-able)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointStore:
    """Per-stage checkpoints (tensors + JSON) under one folder; a stage with a checkpoint is not recomputed."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def _path(self, stage: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{stage}.pt"

    def has(self, stage: str) -> bool:
        return self.folder is not None and self._path(stage).exists()

    def save(self, stage: str, value: Any) -> None:
        if self.folder is None:
            return
        with atomic_output(self._path(stage), suffix=".pt") as tmp:
            torch.save(value, tmp)

    def load(self, stage: str) -> Any:
        return torch.load(self._path(stage), weights_only=False)

    def stage(self, name: str, compute: Callable[[], Any]) -> Any:
        """Run ``compute`` unless the stage was checkpointed by an earlier attempt."""
        if self.has(name):
            return self.load(name)
        value = compute()
        self.save(name, value)
        return value


@dataclass
class RunContext:
    dataset: Dataset
    ipc: int
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    max_per_class: int | None = None
    progress_sink: ProgressSink | None = None
    checkpoints: CheckpointStore = field(default_factory=lambda: CheckpointStore(None))
    is_cancelled: Callable[[], bool] = lambda: False
    log: Callable[[str], None] = lambda message: None
    show_progress_bars: bool = False
    # Loops run through resumable_steps save their state every checkpoint_every iterations or
    # checkpoint_seconds, whichever comes first (only when the checkpoint store has a folder).
    checkpoint_every: int = 50
    checkpoint_seconds: float = 60.0
    executor: Executor | None = None  # fan-out engine (Ray) for heavy stages; None = run in-process
    _train: Split | None = field(default=None, init=False, repr=False)
    timings: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ data
    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def train(self) -> Split:
        """The training split the method may see (at most ``max_per_class`` per class, seeded sample)."""
        if self._train is None:
            self._train = run_train_split(self.dataset, self.max_per_class, self.seed)
        return self._train

    def class_images(self, label: int, limit: int | None = None, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Float [0, 1] images of one class (optionally a random subset of ``limit``)."""
        idx = self.train.class_indices(label)
        if limit is not None and len(idx) > limit:
            rng = rng or np.random.default_rng(self.seed)
            idx = np.sort(rng.choice(idx, size=limit, replace=False))
        return self.train.load(idx).float().div_(255.0)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return self.dataset.normalize(images)

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + offset)

    # ------------------------------------------------------------------ progress and control
    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the wall time of the block to ``timings[stage]`` (recorded in the archive's manifest)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def progress(self, stage: str, fraction: float, message: str | None = None) -> None:
        if self.progress_sink is not None:
            self.progress_sink(stage, float(min(max(fraction, 0.0), 1.0)), message)

    def check_cancelled(self) -> None:
        if self.is_cancelled():
            raise Cancelled("job cancelled")

    def steps(self, total: int, stage: str, every: int | None = None, start: int = 0) -> Iterator[int]:
        """``range(start, total)`` that reports progress, shows a bar in the CLI and honours cancellation."""
        return self.track(range(start, total), stage, total=total, every=every, done=start)

    def track(self, items: Iterable, stage: str, total: int | None = None, every: int | None = None,
              done: int = 0) -> Iterator:
        """Iterate ``items`` (``done`` of ``total`` already finished), checking for cancellation and reporting
        progress before an item whenever ``CHECK_SECONDS`` have passed since the last check (and before every
        ``every``-th item, when given): a cancel is noticed within about one item's time plus ``CHECK_SECONDS``,
        however many items there are."""
        if total is None and isinstance(items, Sized):
            total = len(items)
        bar = None
        if self.show_progress_bars:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=done, desc=stage, leave=False, dynamic_ncols=True)
        self.progress(stage, done / total if total else 0.0)
        last_check = -float("inf")
        with self.timed(stage):
            try:
                for i, item in enumerate(items):
                    now = time.monotonic()
                    if now - last_check >= CHECK_SECONDS or (every is not None and i % every == 0):
                        last_check = now
                        self.check_cancelled()
                        if total:
                            self.progress(stage, (done + i) / total)
                    yield item
                    if bar is not None:
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
        self.progress(stage, 1.0)

    def run_key(self, method: str, params: MethodParams) -> dict[str, Any]:
        """What identifies a run's result: a checkpoint of another key must not be resumed."""
        return {"method": method, "dataset": self.dataset.name, "ipc": self.ipc, "seed": self.seed,
                "max_per_class": self.max_per_class, "params": params.model_dump(mode="json")}

    def resumable_steps(self, total: int, stage: str, state: Resumable, key: dict[str, Any],
                        every: int | None = None) -> Iterator[int]:
        """:meth:`steps` that checkpoints ``state`` into the checkpoint store and resumes from it.

        The checkpoint ``<stage>-loop`` holds the number of finished iterations and ``state.state_dict()``
        after them. It is written every ``checkpoint_every`` iterations or ``checkpoint_seconds`` (whichever
        comes first), when the run is cancelled between iterations and when the loop ends; a run started
        again with the same store and ``key`` (:meth:`run_key`) loads it and continues with the next
        iteration, so a stopped machine loses at most one interval. Without a store folder it is
        :meth:`steps`. An exception inside an iteration saves nothing (that iteration's state is partial).
        """
        name = f"{stage}-loop"
        every = every or 1  # a cancel between two iterations is saved at once: check before each one (a flag read)
        start = 0
        if self.checkpoints.has(name):
            saved = self.checkpoints.load(name)
            if saved.get("key") != key or saved.get("total") != total:
                raise DistillError(f"checkpoint folder {self.checkpoints.folder} holds another run ({saved.get('key')}, "
                                   f"{saved.get('total')} iterations); use a new folder for this one")
            state.load_state_dict(saved["state"])
            start = int(saved["iteration"])
            self.log(f"{stage}: resuming at iteration {start} of {total} from {self.checkpoints.folder}")
        if self.checkpoints.folder is None:
            yield from self.steps(total, stage, every=every, start=start)
            return

        def save(finished: int) -> None:
            self.checkpoints.save(name, {"iteration": finished, "total": total, "key": key, "state": state.state_dict()})

        finished = saved_at = start
        saved_time = time.monotonic()
        try:
            for it in self.steps(total, stage, every=every, start=start):
                yield it
                finished = it + 1
                if finished - saved_at >= self.checkpoint_every or time.monotonic() - saved_time >= self.checkpoint_seconds:
                    save(finished)
                    saved_at, saved_time = finished, time.monotonic()
        except Cancelled:
            if finished > saved_at:
                save(finished)
            raise
        if finished > saved_at or not self.checkpoints.has(name):
            save(finished)


P = TypeVar("P", bound=MethodParams)


class Method(Generic[P]):
    """Base class of a registered method, generic in its parameter model: ``class Foo(Method[FooParams])``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    family: ClassVar[str] = "baseline"
    # True when the heavy stages go through ctx.executor (Ray then runs the job as a driver holding no GPU)
    fans_out: ClassVar[bool] = False
    Params: type[P]

    def run(self, ctx: RunContext, params: P) -> DistilledSet:  # pragma: no cover - abstract
        raise NotImplementedError
