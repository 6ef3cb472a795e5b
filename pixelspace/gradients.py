"""Gradient matching helpers: DC's layer-wise gradient distance and per-class CE gradients of one network.

Used by DC/DSA (:mod:`pixelspace.gradient_matching`) and by the tests that check it against the reference's
per-class loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from distill.errors import DistillError
from pixelspace.precision import autocast_context


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
