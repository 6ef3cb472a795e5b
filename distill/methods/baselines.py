"""Selection baselines: random real images, herding and k-center in a ConvNet feature space.

Herding and k-center follow the coreset baselines the DC/DSA/DM papers compare against: features are the
penultimate embedding of a ConvNet, randomly initialised (default) or a teacher trained on the dataset.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from distill.data.loader import ImageStream
from distill.data.sampling import random_per_class
from distill.files import atomic_output
from distill.methods.base import DistilledSet, Method, MethodParams, NetworkName, RunContext
from distill.nets import Classifier
from distill.teacher import TeacherSpec, get_teacher


class RandomParams(MethodParams):
    pass


class RandomSelection(Method[RandomParams]):
    name = "random"
    summary = "IPC real images per class, drawn uniformly at random (seeded)"
    family = "baseline"
    Params = RandomParams

    def run(self, ctx: RunContext, params: RandomParams) -> DistilledSet:
        with ctx.timed("select"):
            chosen = random_per_class(ctx.train, ctx.num_classes, ctx.ipc, ctx.seed)
        ctx.progress("select", 1.0)
        return _selection(ctx, [chosen])


class CoresetParams(MethodParams):
    features: Literal["random", "teacher"] = Field(
        "random", description="feature space: a randomly initialised ConvNet or a teacher trained on the dataset"
    )
    model: NetworkName = Field("convnet", description="feature network")
    batch_size: int = Field(500, ge=1, description="images per forward pass when embedding")
    teacher_epochs: int = Field(15, ge=1, description="epochs of the teacher when features=teacher")


def _selection(ctx: RunContext, chosen: list[np.ndarray], metrics: dict | None = None) -> DistilledSet:
    indices = np.concatenate(chosen)
    images = ctx.train.load(indices).float().div_(255.0)
    labels = torch.from_numpy(ctx.train.labels[indices].copy())
    return DistilledSet(images=images, labels=labels, extras={"source_indices": torch.from_numpy(indices)},
                        metrics=metrics or {})


def feature_network(ctx: RunContext, params: CoresetParams) -> Classifier:
    """The embedding network: randomly initialised from the run's seed, or the teacher (stage ``teacher``,
    cancellable) trained on the run's own training split (its ``max_per_class`` sample), no other image."""
    from distill.nets import build_network

    ds = ctx.dataset
    if params.features == "teacher":
        spec = TeacherSpec(model=params.model, epochs=params.teacher_epochs, max_per_class=ctx.max_per_class,
                           run_sample=True, seed=ctx.seed, device=str(ctx.device))
        return get_teacher(ds, spec, progress=ctx.progress, check_cancelled=ctx.check_cancelled).to(ctx.device).eval()
    return build_network(params.model, ds.channels, ds.num_classes, ds.image_size, seed=ctx.seed).to(ctx.device).eval()


@torch.no_grad()
def embed_classes(ctx: RunContext, network: Classifier, batch_size: int) -> list[tuple[np.ndarray, torch.Tensor]]:
    """Per class, the indices and embeddings of its (visible, decodable) training images: one stream over every
    class's batches, decoded ahead in loader processes, with progress (stage ``embed``) and cancel per batch."""
    per_class = [ctx.train.class_indices(label) for label in range(ctx.num_classes)]
    chunks = [(label, idx[s : s + batch_size]) for label, idx in enumerate(per_class) for s in range(0, len(idx), batch_size)]
    stream = ImageStream(ctx.train, batches=[chunk for _, chunk in chunks], device=ctx.device)
    kept: list[list[np.ndarray]] = [[] for _ in per_class]
    features: list[list[torch.Tensor]] = [[] for _ in per_class]
    for (label, _), (idx, images) in ctx.track(zip(chunks, stream, strict=True), "embed", total=len(chunks)):
        x = ctx.normalize(images.float().div_(255.0).to(ctx.device))
        kept[label].append(idx)
        features[label].append(network.embed(x).float().cpu())
    return [(np.concatenate(k) if k else np.zeros(0, dtype=np.int64),
             torch.cat(f) if f else torch.zeros(0, network.embed_dim)) for k, f in zip(kept, features, strict=True)]


def herding_order(features: torch.Tensor, k: int) -> list[int]:
    """Greedy herding (Welling 2009): each pick brings the running mean of picks closest to the class mean."""
    mu = features.mean(0)
    selected: list[int] = []
    running = torch.zeros_like(mu)
    available = torch.ones(len(features), dtype=torch.bool)
    for t in range(k):
        candidate_means = (running.unsqueeze(0) + features) / (t + 1)
        distances = (candidate_means - mu).pow(2).sum(1)
        distances[~available] = float("inf")
        best = int(distances.argmin())
        selected.append(best)
        available[best] = False
        running = running + features[best]
    return selected


def kcenter_order(features: torch.Tensor, k: int) -> list[int]:
    """Greedy k-center: start at the point nearest the mean, then repeatedly take the farthest point."""
    first = int((features - features.mean(0)).pow(2).sum(1).argmin())
    selected = [first]
    min_dist = (features - features[first]).pow(2).sum(1)
    for _ in range(k - 1):
        nxt = int(min_dist.argmax())
        selected.append(nxt)
        min_dist = torch.minimum(min_dist, (features - features[nxt]).pow(2).sum(1))
    return selected


class _Coreset(Method[CoresetParams]):
    family = "baseline"
    Params = CoresetParams

    @staticmethod
    def order(features: torch.Tensor, k: int) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, ctx: RunContext, params: CoresetParams) -> DistilledSet:
        features = class_features(ctx, params)
        chosen = []
        for label in ctx.steps(ctx.num_classes, "select"):
            idx, feats = features[label]
            chosen.append(idx[self.order(feats, ctx.ipc)])
        return _selection(ctx, chosen, {"feature_space": params.features})


def class_features(ctx: RunContext, params: CoresetParams) -> list[tuple[np.ndarray, torch.Tensor]]:
    """Per-class embeddings, cached on disk: herding and k-center at every IPC share one pass over the data."""
    from safetensors.torch import load_file, save_file

    from distill.config import get_settings

    key = f"{ctx.dataset.name}-{params.features}-{params.model}-s{ctx.seed}-m{ctx.max_per_class}"
    if params.features == "teacher":
        key += f"-t{params.teacher_epochs}-run"  # the teacher trains on the run's own sample (max_per_class)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key)
    path = get_settings().cache_dir / "features" / f"{safe}.safetensors"
    if path.exists():
        stored = load_file(str(path))
        return [(stored[f"idx{c}"].numpy(), stored[f"feat{c}"]) for c in range(ctx.num_classes)]
    network = feature_network(ctx, params)
    out = embed_classes(ctx, network, params.batch_size)
    tensors = {}
    for c, (idx, feats) in enumerate(out):
        tensors[f"idx{c}"] = torch.from_numpy(idx.copy())
        tensors[f"feat{c}"] = feats.contiguous()
    with atomic_output(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp))
    return out


class Herding(_Coreset):
    name = "herding"
    summary = "Herding selection of real images in a ConvNet feature space"
    order = staticmethod(herding_order)


class KCenter(_Coreset):
    name = "kcenter"
    summary = "Greedy k-center selection of real images in a ConvNet feature space"
    order = staticmethod(kcenter_order)
