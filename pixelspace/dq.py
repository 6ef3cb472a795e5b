"""DQ: Dataset Quantization (Zhou et al., ICCV 2023), selection stages (docs/METHODS.md §6).

1. Bins (``quantize_sample.py``): per class, ``num_bins`` non-overlapping bins chosen one after another by
   NaiveGreedy maximisation of GraphCut (lambda 1) on the samples still in the pool; each bin takes
   round(|class| / num_bins) samples and the last bin is the remainder. GraphCut's gain of x given the
   selected set S is  lambda * sum_{y in pool} sim(y, x) - 2 * sum_{s in S} sim(s, x)
   (``submodular_function.py`` L75-109) with sim = 0.5 + 0.5 cos (``cossim_np``).
   Features are DeepCore's "gradient" features from a teacher: the last layer's bias gradient of
   CE(softmax(logits)) (the reference applies CE to softmax outputs) concatenated with its outer product
   with the penultimate embedding. Their cosine factorises, cos = <a,a'>(1 + <e,e'>) / norms, so the
   C*(d+1)-dimensional vectors are never built.
2. Sampling (``quantize_bin.py``): uniform random samples from every bin, per class, to reach ``ipc``.
   The reference takes a fraction of each bin, which rounds to zero for the small IPCs of this service: here
   ipc is spread evenly over the bins and, when ipc < num_bins, the leftover picks go to the bins chosen
   first (the most representative GraphCut picks).
3. Patch dropping + MAE reconstruction (``quantize_pixel.py``) needs the MAE ViT-L checkpoint (downloaded
   from dl.fbaipublicfiles by the reference); it is not available offline, so ``mae`` must stay unset (a set
   value is rejected when the request is validated).

The teacher is ``distill.evaluate.get_teacher`` (``distill.teacher``) (a ConvNet trained on the train split, cached) or the
network ``teacher_model`` loaded from ``teacher_weights``: over HTTP the name of a model the operator
registered (``DISTILL_MODELS``), never a client path; from the CLI also a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch.nn import functional as F

from distill.data.registry import to_float
from distill.errors import DistillError
from distill.evaluate import EvalConfig, get_teacher
from distill.methods.base import DistilledSet, Method, MethodParams, NetworkName, RegisteredModel, RunContext
from distill.nets import Classifier, build_network


class DQParams(MethodParams):
    num_bins: int = Field(10, ge=1, description="Non-overlapping bins per class (fraction 0.1 -> 10 bins, README)")
    lam: float = Field(1.0, ge=0, description="GraphCut lambda (submodular_function.GraphCut lam=1)")
    features: Literal["gradient", "embedding"] = Field("gradient", description="'gradient': DeepCore's last-layer "
                                                       "gradient features (reference); 'embedding': penultimate features")
    teacher_model: NetworkName = Field("convnet", description="Network whose features drive the selection "
                                       "(reference: ResNet-18 ImageNet-pretrained; no such weights offline, so a "
                                       "ConvNet trained here)")
    teacher_weights: RegisteredModel | None = Field(
        None, description="A model registered on the server (DISTILL_MODELS: a directory holding one .safetensors "
                          "state dict for teacher_model), e.g. pretrained weights; unset: train/reuse the cached teacher")
    teacher_epochs: int = Field(15, ge=1, description="Epochs of the cached teacher when it must be trained")
    teacher_max_per_class: int | None = Field(None, ge=1, description="Images per class the teacher trains on "
                                              "(default: the run's --max-per-class, else all)")
    mae: None = Field(None, description="MAE checkpoint for patch dropping + reconstruction (quantize_pixel.py); "
                                        "not available offline, must be unset")
    mask_ratio: float = Field(0.2, ge=0, lt=1, description="Patches dropped before MAE reconstruction (only with mae)")

    @field_validator("mae", mode="before")
    @classmethod
    def _no_mae(cls, value: object) -> None:
        if value is not None:
            raise ValueError("patch dropping + MAE reconstruction needs the MAE ViT-L/16 model and checkpoint "
                             "(mae_visualize_vit_large_ganloss.pth), which are not available offline; leave mae unset")
        return None


# ------------------------------------------------------------------------------------------------ features
def load_teacher(ctx: RunContext, params: DQParams) -> Classifier:
    ds = ctx.dataset
    if params.teacher_weights:
        net = build_network(params.teacher_model, ds.channels, ds.num_classes, ds.image_size)
        path = teacher_file(Path(params.teacher_weights).expanduser())
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise DistillError(f"{path.name} does not fit {params.teacher_model} on {ds.name}: {str(exc)[:200]}") from None
        return net.to(ctx.device).eval()
    cap = params.teacher_max_per_class or ctx.max_per_class
    config = EvalConfig(teacher_model=params.teacher_model, teacher_epochs=params.teacher_epochs,
                        teacher_max_per_class=cap, seed=ctx.seed, device=str(ctx.device))
    return get_teacher(ds, config, progress=lambda stage, frac: ctx.progress("teacher", frac),
                       check_cancelled=ctx.check_cancelled).to(ctx.device).eval()


def teacher_file(path: Path) -> Path:
    """The state dict of ``teacher_weights``: a file (CLI), or the one .safetensors file of a directory (a
    registered model, resolved to its directory by :func:`distill.models.resolve_models`)."""
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise DistillError(f"teacher_weights: {path.name} must hold exactly one .safetensors file "
                               f"(it holds {len(found)})")
        return found[0]
    if not path.exists():
        raise DistillError(f"teacher_weights not found: {path}")
    return path


def bias_gradients(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d CE(softmax(o), y) / d o in closed form (DeepCore applies CE to the softmax outputs)."""
    p = F.softmax(logits, dim=1)
    g_p = F.softmax(p, dim=1) - F.one_hot(labels, logits.shape[1]).to(p.dtype)
    return p * (g_p - (p * g_p).sum(1, keepdim=True))


@torch.no_grad()
def class_features(ctx: RunContext, teacher: Classifier, indices: np.ndarray, label: int,
                   batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(bias gradients n x C, embeddings n x d) of the given training images of one class."""
    grads, embeds = [], []
    for _, images in ctx.train.batches(batch, indices):
        x = ctx.normalize(to_float(images).to(ctx.device))
        emb = teacher.embed(x)
        logits = teacher.classifier(emb)
        grads.append(bias_gradients(logits, torch.full((len(x),), label, device=x.device)).cpu())
        embeds.append(emb.cpu())
    return torch.cat(grads).double(), torch.cat(embeds).double()


def similarity(grads: torch.Tensor, embeds: torch.Tensor, features: str) -> np.ndarray:
    """n x n 0.5 + 0.5 cos of the (implicit) DeepCore gradient features, or of the embeddings."""
    e_dot = embeds @ embeds.T
    if features == "embedding":
        norms = embeds.norm(dim=1).clamp_min(1e-12)
        cos = e_dot / (norms[:, None] * norms[None, :])
    else:
        a_dot = grads @ grads.T
        dot = a_dot * (1.0 + e_dot)
        norms = (grads.pow(2).sum(1) * (1.0 + embeds.pow(2).sum(1))).sqrt().clamp_min(1e-12)
        cos = dot / (norms[:, None] * norms[None, :])
    return (0.5 + 0.5 * cos).float().numpy()


# ------------------------------------------------------------------------------------------------ bins
def graphcut_greedy(sim: np.ndarray, pool: np.ndarray, budget: int, lam: float = 1.0) -> np.ndarray:
    """NaiveGreedy GraphCut on the sub-kernel of ``pool``: returns ``budget`` indices (into sim) in pick order."""
    sub = sim[np.ix_(pool, pool)]
    colsum = lam * sub.sum(0, dtype=np.float64)
    penalty = np.zeros(len(pool))
    available = np.ones(len(pool), dtype=bool)
    picks = []
    for _ in range(min(budget, len(pool))):
        gain = np.where(available, colsum - 2.0 * penalty, -np.inf)
        best = int(np.argmax(gain))
        picks.append(best)
        available[best] = False
        penalty += sub[best]
    return pool[np.asarray(picks, dtype=np.int64)]


def graphcut_bins(sim: np.ndarray, num_bins: int, lam: float = 1.0) -> list[np.ndarray]:
    """Non-overlapping bins: each greedy GraphCut over what earlier bins left, the last one the remainder."""
    n = len(sim)
    size = max(1, round(n / num_bins))
    remaining = np.arange(n)
    bins: list[np.ndarray] = []
    for b in range(num_bins):
        if len(remaining) == 0:
            bins.append(np.empty(0, dtype=np.int64))
            continue
        if b == num_bins - 1:
            chosen = remaining.copy()
        else:
            chosen = graphcut_greedy(sim, remaining, size, lam)
        bins.append(chosen)
        remaining = np.setdiff1d(remaining, chosen, assume_unique=True)
    return bins


def sample_bins(bins: list[np.ndarray], ipc: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """ipc picks spread evenly over the bins (extra picks to the first bins), uniform within each bin;
    a bin too small passes its quota on. Returns (indices, bin of each pick)."""
    k = len(bins)
    quota = [ipc // k + (1 if b < ipc % k else 0) for b in range(k)]
    picks: list[int] = []
    origin: list[int] = []
    carry = 0
    for b, members in enumerate(bins):
        want = quota[b] + carry
        take = min(want, len(members))
        carry = want - take
        if take:
            chosen = rng.choice(members, size=take, replace=False)
            picks.extend(int(i) for i in chosen)
            origin.extend([b] * take)
    if carry:  # wrap around for anything still missing
        left = np.setdiff1d(np.concatenate(bins), np.asarray(picks, dtype=np.int64))
        extra = rng.choice(left, size=carry, replace=False)
        picks.extend(int(i) for i in extra)
        origin.extend(-1 for _ in extra)
    return np.asarray(picks, dtype=np.int64), np.asarray(origin, dtype=np.int64)


# ------------------------------------------------------------------------------------------------ method
class DatasetQuantization(Method[DQParams]):
    name: ClassVar[str] = "dq"
    summary: ClassVar[str] = "GraphCut-selected non-overlapping bins, sampled uniformly (Dataset Quantization, ICCV 2023)"
    family: ClassVar[str] = "selection"
    Params = DQParams

    def run(self, ctx: RunContext, params: DQParams) -> DistilledSet:
        with ctx.timed("teacher"):
            teacher = load_teacher(ctx, params)
        rng = np.random.default_rng(ctx.seed + 41)
        picked, bin_of, labels = [], [], []
        bin_sizes: list[list[int]] = []
        for c in ctx.track(range(ctx.num_classes), "bins", total=ctx.num_classes):
            indices = ctx.train.class_indices(c)
            if len(indices) < ctx.ipc:
                raise DistillError(f"class {c} has {len(indices)} images, fewer than ipc {ctx.ipc}")
            grads, embeds = class_features(ctx, teacher, indices, c)
            sim = similarity(grads, embeds, params.features)
            bins = graphcut_bins(sim, params.num_bins, params.lam)
            chosen, origin = sample_bins(bins, ctx.ipc, rng)
            picked.append(indices[chosen])
            bin_of.append(origin)
            labels.append(np.full(ctx.ipc, c))
            bin_sizes.append([len(b) for b in bins])
        train_index = np.concatenate(picked)
        images = to_float(ctx.train.load(train_index))
        return DistilledSet(
            images=images,
            labels=torch.from_numpy(np.concatenate(labels)),
            extras={"train_index": torch.from_numpy(train_index), "bin": torch.from_numpy(np.concatenate(bin_of))},
            metrics={"bin_sizes_per_class": bin_sizes, "features": params.features, "teacher": params.teacher_model,
                     "teacher_weights": Path(params.teacher_weights).name if params.teacher_weights
                     else "cached get_teacher"},
        )
