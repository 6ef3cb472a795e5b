"""DM: Dataset Condensation with Distribution Matching (Zhao & Bilen, WACV 2023).

Faithful to VICO-UoE/DatasetCondensation ``main_DM.py``: every iteration samples a randomly initialised
network with frozen parameters (train mode) and moves the synthetic images (SGD lr_img, momentum 0.5) so
that, per class, the mean embedding of the Siamese-augmented synthetic images matches the mean embedding
of a Siamese-augmented real batch: loss = sum_c ||mean embed(real_c) - mean embed(syn_c)||^2 (linear
kernel MMD, no normalisation). BatchNorm models put all classes through one forward pass (statistics mix
classes), as the reference does.

Speed: the reference runs one real forward per class; here the real batches of all classes go through one
graph-free forward (in chunks bounding memory; bf16 on CPUs with native bf16, torch.compile for long runs)
and the synthetic images of a group of classes through one forward with a graph (the same bf16 and compile
switches: ``syn_precision``, ``compile_syn``). The loss is identical (each embedding depends only on its own
image for non-BN networks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from distill.augment import diff_augment
from distill.fastpath import COMPILE_MIN_WORK, run_work
from distill.methods.base import DistilledSet, DsaStrategy, Method, MethodParams, NetworkName, RunContext
from pixelspace.precision import REAL_PRECISION_HELP, arithmetic_name, autocast_context, real_autocast_dtype
from pixelspace.realpass import COMPILE_REAL_HELP, RealPass, compile_wanted, network_state, real_embed_pass
from pixelspace.synthetic import draw_seed, fresh_network, has_batchnorm, matching_setup, network_iterations

SYN_PRECISION_HELP = (
    "Arithmetic of the synthetic side's forward and backward (the images' gradient) on a network without batch "
    "norm: 'fp32' as the reference; 'bf16' autocasts its convolutions to bfloat16 (the embeddings, the loss and the "
    "image update stay fp32); 'auto' = bf16 where it is native, as real_precision. At IPC 50 this pass is most of "
    "an iteration.")
COMPILE_SYN_HELP = (
    "torch.compile the synthetic side's pass (a network without batch norm): 'auto' on CPU and CUDA for runs of at "
    "least 50 iterations that push at least 50 M image-pixels through it (iterations x synthetic images x side^2, "
    "evaluation's rule for compiling a training network: IPC 10 at 64 px, not MNIST's IPC 10); 'on' / 'off' force it.")


def syn_compile_wanted(setting: str, device: torch.device, iterations: int, images: int, image_size: int) -> bool:
    """``compile_syn``: 'on' / 'off', or 'auto': long enough for the real pass's rule and enough synthetic work to
    repay a compilation (:data:`distill.fastpath.COMPILE_MIN_WORK`)."""
    wanted = compile_wanted(setting, device, iterations)
    if setting != "auto":
        return wanted
    return wanted and run_work(iterations, images, image_size) >= COMPILE_MIN_WORK


class DMParams(MethodParams):
    iterations: int = Field(20000, ge=1, description="Iterations, each with a new random frozen network (reference --Iteration).")
    lr_img: float | None = Field(
        None, gt=0, description="SGD (momentum 0.5) lr of the images; None = 1.0 below IPC 100, 10 from 100 (README).")
    batch_real: int = Field(256, ge=1, description="Real images per class per iteration.")
    init: Literal["noise", "real"] = Field("real", description="Synthetic initialisation (reference default real).")
    model: NetworkName = Field(
        "convnet", description="Embedding network (distill.nets name; reference ConvNet-3, instance norm).")
    dsa_strategy: DsaStrategy = Field(
        "auto", description="Siamese DSA ops joined by '_'; 'auto' = color_crop_cutout_flip_scale_rotate, no flip for digits.")
    real_chunk: int = Field(512, ge=1, description="Real images per graph-free forward (memory bound; no effect on results).")
    real_precision: Literal["auto", "fp32", "bf16"] = Field("auto", description=REAL_PRECISION_HELP)
    compile_real: Literal["auto", "on", "off"] = Field("auto", description=COMPILE_REAL_HELP)
    syn_precision: Literal["auto", "fp32", "bf16"] = Field("auto", description=SYN_PRECISION_HELP)
    compile_syn: Literal["auto", "on", "off"] = Field("auto", description=COMPILE_SYN_HELP)


def embed_fn(net: nn.Module):
    return net.embed if hasattr(net, "embed") else net


def real_embeddings(
    net: nn.Module,
    real: torch.Tensor,
    real_chunk: int = 512,
    real_dtype: torch.dtype | None = None,
    real_embed: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """C x n x d embeddings of a class-stacked real batch, without a graph, in chunks of ``real_chunk`` images
    (in ``real_dtype`` arithmetic when given, e.g. torch.bfloat16), or through ``real_embed`` ((state dict,
    images) -> embeddings, e.g. a compiled :class:`RealPass`)."""
    embed = embed_fn(net)
    classes, n = real.shape[:2]
    flat = real.reshape(classes * n, *real.shape[2:])
    with torch.no_grad():
        if real_embed is not None:
            state = network_state(net)
            feats = torch.cat([real_embed(state, flat[s : s + real_chunk]) for s in range(0, len(flat), real_chunk)])
        else:
            with autocast_context(real.device, real_dtype):
                feats = torch.cat([embed(flat[s : s + real_chunk]).float() for s in range(0, len(flat), real_chunk)])
    return feats.view(classes, n, -1)


def class_mean_loss(feats_real: torch.Tensor, feats_syn: torch.Tensor,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """DM's loss: sum_c ||mean embed(real_c) - mean embed(syn_c)||^2 (C x n x d and C x ipc x d embeddings); with
    ``weights`` (C x ipc, each class summing to 1) the synthetic mean is the weighted one the student's loss sees."""
    mean_syn = feats_syn.mean(1) if weights is None else (weights.to(feats_syn.device).unsqueeze(-1) * feats_syn).sum(1)
    return ((feats_real.mean(1) - mean_syn) ** 2).sum()


def cell_mean_loss(feats_real: torch.Tensor, real_cells: torch.Tensor, feats_syn: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """sum_c sum_k w_ck ||mean embed(real_c in cell k) - embed(syn_ck)||^2: synthetic image k of a class matches
    the mean embedding of its own quantization cell (``real_cells`` C x n, -1 = in no cell), weighted by the
    cell's mass (``weights`` C x ipc); a cell with no image in the batch adds nothing this iteration."""
    cells = feats_syn.shape[1]
    inside = (real_cells >= 0).unsqueeze(-1)
    onehot = torch.nn.functional.one_hot(real_cells.clamp_min(0), cells).to(feats_real.dtype) * inside  # C x n x K
    counts = onehot.sum(1)  # C x K
    means = torch.einsum("cnk,cnd->ckd", onehot, feats_real) / counts.clamp_min(1).unsqueeze(-1)
    per_cell = ((means - feats_syn) ** 2).sum(-1)  # C x K
    return (weights.to(per_cell.device) * (counts > 0) * per_cell).sum()


@dataclass
class CellTargets:
    """The quantization cells of a cell-matched refinement (``oq``'s ``refine_match``): each synthetic image also
    matches the mean embedding of its own cell's real images, weighted by the cell's mass."""

    cells: list[torch.Tensor]  # per class, the cell (0..ipc-1) of each real-pool position; -1 = in no cell
    weights: torch.Tensor  # C x ipc cell masses, each class summing to 1
    class_term: bool  # keep DM's class-mean term beside the cell terms
    cell_term: bool = True  # False: only the class mean, its synthetic side weighted by the masses


def dm_loss_naive(net: nn.Module, real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """The reference's per-class loop (tests and speed benchmark)."""
    embed = embed_fn(net)
    loss = torch.zeros((), device=syn.device)
    for c in range(real.shape[0]):
        output_real = embed(real[c]).detach()
        output_syn = embed(syn[c])
        loss = loss + torch.sum((output_real.mean(0) - output_syn.mean(0)) ** 2)
    return loss


def augment_classes(real: torch.Tensor, syn: torch.Tensor, strategy: str,
                    seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DSA's siamese augmentation of class-stacked batches: class c's real and synthetic images share seed c."""
    real = torch.stack([diff_augment(real[c], strategy, seed=s) for c, s in enumerate(seeds)])
    syn = torch.stack([diff_augment(syn[c], strategy, seed=s) for c, s in enumerate(seeds)])
    return real, syn


def matching_loss(
    net: nn.Module,
    real: torch.Tensor,
    syn: torch.Tensor,
    real_chunk: int = 512,
    real_dtype: torch.dtype | None = None,
    real_embed: Callable[..., torch.Tensor] | None = None,
    cells: CellTargets | None = None,
    real_cells: torch.Tensor | None = None,
    syn_dtype: torch.dtype | None = None,
    syn_embed: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """One DM iteration's loss in ``net``'s features (C x n real, C x ipc synthetic, both augmented): the class
    means (:func:`class_mean_loss`), or with ``cells`` the refinement's cell-matched terms (``real_cells``: the
    cell of each real image, needed when ``cells.cell_term``). The synthetic side runs in ``syn_dtype`` autocast
    (fp32 when None), or through ``syn_embed`` ((state dict, images) -> fp32 embeddings with a graph to the
    images, e.g. a compiled :class:`RealPass`), on a network without batch norm."""
    embed = embed_fn(net)
    classes = syn.shape[0]
    flat_syn = syn.reshape(-1, *syn.shape[2:])
    if has_batchnorm(net):
        # Reference BN branch: one forward over all classes (BN statistics mix classes).
        feats_real = embed(real.reshape(-1, *real.shape[2:])).detach().view(classes, real.shape[1], -1)
        feats_syn = embed(flat_syn)
    else:
        feats_real = real_embeddings(net, real, real_chunk, real_dtype, real_embed)
        if syn_embed is not None:
            feats_syn = syn_embed(network_state(net), flat_syn)
        else:
            with autocast_context(syn.device, syn_dtype):
                feats_syn = embed(flat_syn).float()
    feats_syn = feats_syn.view(classes, syn.shape[1], -1)
    if cells is None:
        return class_mean_loss(feats_real, feats_syn)
    if not cells.cell_term:
        return class_mean_loss(feats_real, feats_syn, cells.weights)
    assert real_cells is not None
    loss = cell_mean_loss(feats_real, real_cells.to(feats_real.device), feats_syn, cells.weights)
    return loss + class_mean_loss(feats_real, feats_syn) if cells.class_term else loss


def class_groups(num_classes: int, per_pass: int) -> list[slice]:
    """Consecutive class ranges of at most ``per_pass`` classes (a batch-norm network takes them all at once:
    its statistics mix classes, as in the reference)."""
    return [slice(start, min(start + per_pass, num_classes)) for start in range(0, num_classes, per_pass)]


def synthetic_classes_per_pass(params: DMParams, ctx: RunContext) -> int:
    """How many classes' synthetic images one forward/backward holds within the device's activation budget
    (:func:`distill.training.memory_budget_gb`): all of a small set's at once, one class at a time at 128 px and
    IPC 50 (about 2 GB of activations per class on a ConvNet), so large sets no longer need memory for every
    class's graph together."""
    from distill.training import activation_bytes, batch_for, memory_budget_gb

    per_class = ctx.ipc * activation_bytes(params.model, ctx.dataset.channels, ctx.dataset.image_size, True)
    return batch_for(memory_budget_gb(ctx.device), per_class, ctx.dataset.num_classes)


def cells_in(cells: CellTargets | None, group: slice) -> CellTargets | None:
    """``cells`` restricted to the classes of ``group`` (the terms :func:`matching_loss` reads)."""
    return None if cells is None else replace(cells, weights=cells.weights[group])


class DistributionMatching(Method[DMParams]):
    name: ClassVar[str] = "dm"
    summary: ClassVar[str] = "Distribution Matching: match mean embeddings of random networks per class (WACV 2023)."
    family: ClassVar[str] = "pixel"
    Params = DMParams

    def run(self, ctx: RunContext, params: DMParams, initial: torch.Tensor | None = None,
            cells: CellTargets | None = None) -> DistilledSet:
        """``initial``: start from these class-ordered [0, 1] images instead of ``params.init`` (a refinement,
        reported as the stage ``refine``); ``cells``: match per quantization cell too (:func:`cell_mean_loss`)."""
        ds = ctx.dataset
        lr_img = params.lr_img if params.lr_img is not None else (1.0 if ctx.ipc < 100 else 10.0)
        setup = matching_setup(ctx, params, 13, lr_img, initial)
        real_embed = syn_embed = None
        with torch.random.fork_rng(devices=[]):  # the compiled passes' template leaves the run's draws alone
            template = fresh_network(params.model, ctx, seed=0)
        if compile_wanted(params.compile_real, ctx.device, params.iterations):
            real_embed = RealPass(real_embed_pass(template, setup.real_dtype), compile=True, log=ctx.log,
                                  check_cancelled=ctx.check_cancelled)
        # batch-norm networks keep the reference's eager fp32 synthetic pass (matching_loss's BN branch)
        batchnorm = has_batchnorm(template)
        syn_dtype = None if batchnorm else real_autocast_dtype(params.syn_precision, ctx.device)
        if not batchnorm and syn_compile_wanted(params.compile_syn, ctx.device, params.iterations,
                                                              ctx.ipc * ds.num_classes, ds.image_size):
            syn_embed = RealPass(real_embed_pass(template, syn_dtype), compile=True, log=ctx.log,
                                 check_cancelled=ctx.check_cancelled)
        stage = "distill" if initial is None else "refine"
        classes_per_pass = synthetic_classes_per_pass(params, ctx)
        for it, net in network_iterations(ctx, self.name, params, params.iterations, params.model, setup.state, stage):
            for p in net.parameters():
                p.requires_grad_(False)
            real_cells = None
            if cells is None or not cells.cell_term:  # the same draws either way; only cell terms read positions
                real = setup.pool.sample_all(params.batch_real, setup.generator)
            else:
                real, positions = setup.pool.sample_all_with_positions(params.batch_real, setup.generator)
                real_cells = torch.stack([cells.cells[c][positions[c]] for c in range(ds.num_classes)])
            syn = setup.image_syn.view(ds.num_classes, ctx.ipc, *setup.image_syn.shape[1:])
            seeds = [draw_seed(setup.generator) for _ in range(ds.num_classes)] if setup.strategy != "none" else []
            setup.optimizer_img.zero_grad(set_to_none=True)
            total = 0.0
            for group in class_groups(ds.num_classes, ds.num_classes if has_batchnorm(net) else classes_per_pass):
                real_g, syn_g = real[group], syn[group]
                if seeds:
                    real_g, syn_g = augment_classes(real_g, syn_g, setup.strategy, seeds[group])
                loss = matching_loss(net, real_g, syn_g, params.real_chunk, setup.real_dtype, real_embed,
                                     cells_in(cells, group), None if real_cells is None else real_cells[group],
                                     syn_dtype, syn_embed)
                loss.backward()  # each class's loss reaches only its own images: the sum's gradient, in parts
                total += float(loss.detach())
            setup.optimizer_img.step()
            setup.losses.append(total / ds.num_classes)
            if it % 100 == 0:
                ctx.log(f"dm iteration {it}: loss {setup.losses[-1]:.4f}")
        return setup.result(ctx, lr_img=lr_img, syn_precision=arithmetic_name(syn_dtype))
