"""Shared building blocks of the pixel-space methods (DD, DC, DSA, DM; MTT/DATM/DQ may import them too).

Everything here works in *normalised* image space (what the networks see), as the references do; methods
convert back to pixel scale with :func:`to_pixel` only when they hand a :class:`DistilledSet` out.

Stable API (other modules import it; keep signatures):
- :func:`get_loops` - DC/DSA (outer_loop, inner_loop) per IPC, with values for IPCs the reference lacks.
- :class:`RealPool` - per-class real images (uint8 in memory), seeded batches, normalised on the fly.
- :func:`init_synthetic` - class-ordered synthetic set from noise or from real images.
- :func:`match_distance` - DC's layer-wise gradient distance ('ours', 'mse', 'cos'), optionally batched.
- :func:`per_class_gradients` - gradients of the CE loss of each class batch (vmap over classes, or a loop).
- :func:`real_autocast_dtype` / :func:`autocast_context` - optional bf16 arithmetic of the real side.
- :class:`RealPass`, :func:`real_ce_pass`, :func:`real_embed_pass`, :func:`compile_wanted` - the real side's
  network pass as a pure function of a parameter dict, optionally through torch.compile.
- :func:`image_optimizer`, :func:`to_pixel`, :func:`resolve_strategy`, :func:`draw_seed`,
  :func:`fresh_network`, :func:`has_batchnorm`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from distill.augment import strategy_for
from distill.errors import DistillError
from distill.methods.base import DistilledSet, RunContext
from distill.nets import build_network

# DC's get_loops (utils.py L275-293): ipc -> (outer_loop, inner_loop).
REFERENCE_LOOPS: dict[int, tuple[int, int]] = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def get_loops(ipc: int) -> tuple[int, int]:
    """(outer_loop, inner_loop) for an IPC; never exits.

    Tabulated IPCs use the reference values. Elsewhere we follow the reference's pattern: outer_loop = ipc
    and outer x inner about 500 network epochs per iteration, so inner = clamp(round(500 / ipc), 1, 50)
    (IPC 2-9 -> 50 like IPC 10; IPC 100 -> 5; IPC 1000 -> 1).
    """
    if ipc < 1:
        raise DistillError(f"ipc must be >= 1 (got {ipc})")
    if ipc in REFERENCE_LOOPS:
        return REFERENCE_LOOPS[ipc]
    return ipc, int(min(50, max(1, round(500 / ipc))))


def draw_seed(generator: torch.Generator) -> int:
    """A seed for one Siamese DSA call (the reference uses the wall clock; we stay reproducible)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def resolve_strategy(strategy: str, digits: bool) -> str:
    """'auto' -> the dataset's recommended DSA strategy (no flip for digits); 'none' disables."""
    if strategy == "auto":
        return strategy_for(digits)
    return strategy


class RealPool:
    """Real training images per class, kept as uint8 (4x less memory than the reference's float copy).

    Batches are drawn like the reference's ``get_images``: a random permutation of the class, first n.
    """

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        split = ctx.train
        self.num_classes = ctx.num_classes
        self.by_class: list[torch.Tensor] = []
        for c in range(self.num_classes):
            idx = split.class_indices(c)
            if len(idx) == 0:
                raise DistillError(f"class {c} of {ctx.dataset.name} has no training images")
            self.by_class.append(split.load(idx).contiguous())
        self.device = ctx.device

    def count(self, c: int) -> int:
        return len(self.by_class[c])

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return self.ctx.normalize(images.to(self.device).float().div_(255.0))

    def sample(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """n normalised images of class c (fewer if the class is smaller), without replacement."""
        pick = torch.randperm(self.count(c), generator=generator)[:n]
        return self._normalise(self.by_class[c][pick])

    def sample_all(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Class-stacked batch C x n x ch x H x W (n is capped by the smallest class)."""
        n = min(n, min(self.count(c) for c in range(self.num_classes)))
        return torch.stack([self.sample(c, n, generator) for c in range(self.num_classes)])

    def sample_mixed(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n images drawn uniformly from the whole (capped) train split with labels (DD's real loader)."""
        counts = torch.tensor([self.count(c) for c in range(self.num_classes)])
        total = int(counts.sum())
        pick = torch.randperm(total, generator=generator)[: min(n, total)].sort().values
        offsets = torch.cumsum(counts, 0) - counts
        labels = torch.bucketize(pick, torch.cumsum(counts, 0), right=True)
        images = torch.stack([self.by_class[int(c)][int(i - offsets[c])] for i, c in zip(pick, labels, strict=True)])
        return self._normalise(images), labels.to(self.device)


def init_synthetic(
    ctx: RunContext, pool: RealPool | None, init: str, generator: torch.Generator, ipc: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-ordered synthetic images (normalised space) and their hard labels.

    'noise': standard normal in normalised space (DC/DD ``torch.randn``); 'real': random real images of
    each class (DC/DSA/DM ``--init real``), drawn exactly as the ``random`` baseline draws them for ctx.seed.
    """
    ipc = ipc or ctx.ipc
    ds = ctx.dataset
    shape = (ds.num_classes * ipc, ds.channels, ds.image_size, ds.image_size)
    labels = torch.arange(ds.num_classes, device=ctx.device).repeat_interleave(ipc)
    if init == "noise":
        images = torch.randn(shape, generator=generator).to(ctx.device)
    elif init == "real":
        if pool is None:
            raise DistillError("init 'real' needs real images")
        # The same draw as the `random` baseline for this seed (numpy default_rng(seed), classes in order),
        # so a method's gain over `random` is what distillation added to those very images.
        rng = np.random.default_rng(ctx.seed)
        picks = []
        for c in range(ds.num_classes):
            if pool.count(c) < ipc:
                raise DistillError(f"init 'real' needs {ipc} images of class {c}; it has {pool.count(c)}")
            picks.append(pool._normalise(pool.by_class[c][np.sort(rng.choice(pool.count(c), size=ipc, replace=False))]))
        images = torch.cat(picks)
    else:
        raise DistillError(f"unknown init '{init}' (use 'noise' or 'real')")
    return images.contiguous(), labels


def to_pixel(ctx: RunContext, images: torch.Tensor) -> torch.Tensor:
    """Normalised images -> pixel scale (not clamped: evaluation must see exactly what was learned)."""
    return ctx.dataset.denormalize(images.detach()).cpu()


def matching_result(
    ctx: RunContext, image_syn: torch.Tensor, label_syn: torch.Tensor, losses: list[float],
    real_dtype: torch.dtype | None, strategy: str, **metrics,
) -> DistilledSet:
    """The DistilledSet every image-optimising method returns: pixel-scale images, loss curve, common metrics."""
    return DistilledSet(
        images=to_pixel(ctx, image_syn),
        labels=label_syn.cpu(),
        extras={"loss_curve": torch.tensor(losses)},
        metrics={
            "final_loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None,
            **metrics,
            "dsa_strategy": strategy,
            "real_precision": str(real_dtype or torch.float32).replace("torch.", ""),
            "space": "normalised during optimisation, pixel scale in the archive",
        },
    )


def image_optimizer(images: torch.Tensor, lr: float, momentum: float = 0.5) -> torch.optim.SGD:
    """The references' image optimiser: SGD with momentum 0.5 on the synthetic images."""
    return torch.optim.SGD([images], lr=lr, momentum=momentum)


def fresh_network(model: str, ctx: RunContext, seed: int) -> nn.Module:
    """A newly initialised network (the references sample one per iteration)."""
    ds = ctx.dataset
    return build_network(model, ds.channels, ds.num_classes, ds.image_size, seed=seed).to(ctx.device)


def has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


# ------------------------------------------------------------------------------ gradient distance
def _layer_distance(gs: torch.Tensor, gr: torch.Tensor, batch_dims: int) -> torch.Tensor | None:
    """DC's ``distance_wb``: 1 - cosine per output channel, summed; None for 1-D tensors (ignored)."""
    lead = gs.shape[:batch_dims]
    shape = gs.shape[batch_dims:]
    if len(shape) == 1:
        return None
    if len(shape) in (3, 4):  # LayerNorm C x h x w, conv out x in x h x w -> out x rest
        gs = gs.reshape(*lead, shape[0], -1)
        gr = gr.reshape(*lead, shape[0], -1)
    dots = (gr * gs).sum(-1)
    norms = gr.norm(dim=-1) * gs.norm(dim=-1) + 1e-6
    return (1 - dots / norms).sum(-1)


def match_distance(
    gw_syn: Sequence[torch.Tensor], gw_real: Sequence[torch.Tensor], metric: str = "ours", batch_dims: int = 0
) -> torch.Tensor:
    """DC's ``match_loss`` between two lists of parameter gradients.

    metric 'ours': layer-wise distance (per output channel cosine distance, summed over channels and
    layers; 1-D tensors such as biases and norm affines ignored, as the reference does).
    'mse': squared L2 of the concatenated flat gradients; 'cos': 1 - cosine of the concatenated gradients
    (these two include the 1-D tensors, as the reference does).
    ``batch_dims`` leading dimensions (e.g. one per class) are kept: the result has that shape.
    """
    if len(gw_syn) != len(gw_real):
        raise ValueError("gradient lists differ in length")
    if metric == "ours":
        total = None
        for gs, gr in zip(gw_syn, gw_real, strict=True):
            d = _layer_distance(gs, gr, batch_dims)
            if d is not None:
                total = d if total is None else total + d
        if total is None:
            lead = gw_syn[0].shape[:batch_dims] if gw_syn else ()
            return torch.zeros(lead, device=gw_syn[0].device if gw_syn else None)
        return total
    lead = gw_syn[0].shape[:batch_dims]
    vs = torch.cat([g.reshape(*lead, -1) for g in gw_syn], dim=-1)
    vr = torch.cat([g.reshape(*lead, -1) for g in gw_real], dim=-1)
    if metric == "mse":
        return ((vs - vr) ** 2).sum(-1)
    if metric == "cos":
        return 1 - (vr * vs).sum(-1) / (vr.norm(dim=-1) * vs.norm(dim=-1) + 1e-6)
    raise DistillError(f"unknown distance metric '{metric}' (use ours, mse or cos)")


# ------------------------------------------------------------------------------ precision of the real side
REAL_PRECISION_HELP = (
    "Arithmetic of the real-batch side only (real gradients / real embeddings, the matching targets): "
    "'fp32' as the reference; 'bf16' autocasts its convolutions to bfloat16 (about 1.7x faster on CPUs with "
    "AVX512-BF16; measured error 20x below the sampling noise of a 256-image batch); 'auto' = bf16 on such "
    "CPUs, fp32 elsewhere. The synthetic side and the image update always stay fp32."
)


def bf16_fast_on(device: torch.device) -> bool:
    """True on CPUs whose oneDNN has native bfloat16 kernels (AVX512-BF16 / AMX)."""
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision_dtype(precision: str, device: torch.device, parameter: str = "real_precision") -> torch.dtype | None:
    """A precision setting ('fp32', 'bf16', or 'auto' = bf16 where native) as None (fp32) or torch.bfloat16."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if bf16_fast_on(device) else None
    raise DistillError(f"unknown {parameter} '{precision}' (use auto, fp32 or bf16)")


def real_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the real side (``real_precision``): None (fp32) or torch.bfloat16."""
    return precision_dtype(precision, device, "real_precision")


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for ``dtype`` on ``device``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ------------------------------------------------------------------------------ compiled real pass
COMPILE_REAL_HELP = (
    "torch.compile the real side's network pass (fuses norm, ReLU and pooling around the convolutions; measured "
    "1.4-1.6x on that pass on CPU, fp32 and bf16 alike). Costs about 25 s of compilation once per run, so 'auto' "
    "turns it on only on CPU for runs of at least 50 iterations; 'on' / 'off' force it. Falls back to eager, "
    "with a log line, when the host cannot compile (no C++ compiler).")
COMPILE_MIN_ITERATIONS = 50


def compile_wanted(setting: str, device: torch.device, iterations: int) -> bool:
    """Whether to compile the real pass: 'on', 'off', or 'auto' (CPU and long enough to pay back)."""
    if setting == "auto":
        return device.type == "cpu" and iterations >= COMPILE_MIN_ITERATIONS
    if setting in ("on", "off"):
        return setting == "on"
    raise DistillError(f"unknown compile_real '{setting}' (use auto, on or off)")


class RealPass:
    """A pure function of (parameter dict, batch ...) of one architecture, optionally through torch.compile.

    Methods sample a fresh network every iteration; the function closes over one *template* network of the
    run's architecture and receives each iteration's parameter values as inputs, so it compiles once per
    run, not per network. If compilation fails, the pass runs eager from then on (logged once).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], compile: bool, log: Callable[[str], None] | None = None):
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=False) if compile else None
        self.log = log or (lambda message: None)

    def __call__(self, *args: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager function is the same math
                self.log(f"torch.compile of the real pass failed ({type(exc).__name__}: {exc}); running eager")
                self.compiled = None
        return self.fn(*args)


def network_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """Detached parameters and buffers by name: the inputs a :class:`RealPass` takes for ``net``."""
    return {**{k: v.detach() for k, v in net.named_parameters()}, **dict(net.named_buffers())}


def real_ce_pass(template: nn.Module, autocast_dtype: torch.dtype | None) -> Callable[..., torch.Tensor]:
    """(state dict, images, labels) -> mean CE of ``template``'s architecture with those values."""

    def ce(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast_context(x.device, autocast_dtype):
            out = functional_call(template, state, (x,))
        return F.cross_entropy(out.float(), y)

    return ce


class _Embedding(nn.Module):
    """``net.embed`` as a module's forward, so functional_call can run it with other parameter values."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x) if hasattr(self.net, "embed") else self.net(x)


def real_embed_pass(template: nn.Module, autocast_dtype: torch.dtype | None) -> Callable[..., torch.Tensor]:
    """(state dict, images) -> fp32 embeddings of ``template``'s architecture with those values."""
    wrapper = _Embedding(template)

    def embed(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with autocast_context(x.device, autocast_dtype):
            out = functional_call(wrapper, {f"net.{k}": v for k, v in state.items()}, (x,))
        return out.float()

    return embed


# ------------------------------------------------------------------------------ per-class gradients
def per_class_gradients(
    net: nn.Module,
    params: dict[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    buffers: dict[str, torch.Tensor] | None = None,
    class_chunk: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    strategy: str = "vmap",
    fixed: dict[str, torch.Tensor] | None = None,
    real_loss: Callable[..., torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Gradients of the mean CE w.r.t. ``params`` for each class batch.

    images: K x n x ch x H x W, labels: K x n. Returns one K x param-shape tensor per parameter, in
    ``params`` order.
    strategy 'vmap': torch.func ``vmap(grad(...))`` over classes (``class_chunk`` classes at a time);
    differentiable w.r.t. ``images`` when autograd is active (second order, like ``create_graph=True``):
    used for the synthetic side. strategy 'loop': one plain forward/backward per class without a graph
    to the images (the real side: on CPU, conv weight gradients under vmap become grouped convolutions,
    which measured slower and 3x the memory of a per-class loop).
    ``autocast_dtype`` (e.g. torch.bfloat16) runs the network under autocast; gradients stay fp32.
    ``fixed``: further parameters the network needs but that are not differentiated (e.g. the 1-D ones
    the layer-wise distance ignores: skipping them saves about 10 % of a backward pass).
    ``real_loss``: for the loop strategy, a (state dict, x, y) -> loss function of the same architecture
    (a :class:`RealPass` over :func:`real_ce_pass`, possibly compiled) used instead of the eager forward.
    Networks with BatchNorm must be in eval mode.
    """
    buffers = buffers if buffers is not None else {k: v for k, v in net.named_buffers()}
    fixed = fixed or {}
    device = images.device

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast_context(device, autocast_dtype):
            out = functional_call(net, ({**fixed, **p}, buffers), (x,))
        return F.cross_entropy(out.float(), y)

    k = images.shape[0]
    if strategy == "loop":
        leaves = {name: v.detach().requires_grad_(True) for name, v in params.items()}
        per_class = []
        with torch.enable_grad():
            for c in range(k):
                if real_loss is not None:
                    loss = real_loss({**fixed, **leaves, **buffers}, images[c], labels[c])
                else:
                    loss = loss_fn(leaves, images[c], labels[c])
                grads = torch.autograd.grad(loss, list(leaves.values()))
                per_class.append([g.detach() for g in grads])
        return [torch.stack([pc[i] for pc in per_class]) for i in range(len(leaves))]
    if strategy != "vmap":
        raise ValueError(f"unknown strategy '{strategy}'")
    batched = vmap(grad(loss_fn), in_dims=(None, 0, 0))
    step = k if not class_chunk else max(1, class_chunk)
    parts = [batched(params, images[s : s + step], labels[s : s + step]) for s in range(0, k, step)]
    return [torch.cat([part[name] for part in parts]) if len(parts) > 1 else parts[0][name] for name in params]


def detached_params(net: nn.Module) -> dict[str, torch.Tensor]:
    """The network's parameters as plain tensors (the image gradient does not flow into the network)."""
    return {k: v.detach() for k, v in net.named_parameters()}


def class_chunk_for(per_class_images: int, budget_images: int = 1024) -> int:
    """How many classes to vmap at once so about ``budget_images`` real images share one pass."""
    return max(1, budget_images // max(1, per_class_images))
