"""``distill prior ...``: train the small class-conditional latent prior that ``oq`` can decode through.

Only typer is imported at module level so ``distill --help`` stays fast; torch/diffusers load in the command.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

prior_app = typer.Typer(no_args_is_help=True, help="Latent diffusion priors (class-conditional DiT) per dataset.")


class _TrainBar:
    """One tqdm bar for the run: encoding (first call of the cache) then training iterations."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=1000, desc="prior", leave=False, dynamic_ncols=True,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")

    def __call__(self, fraction: float, message: str | None = None) -> None:
        if self.bar is None:
            return
        if message:
            self.bar.set_postfix_str(message, refresh=False)
        target = int(fraction * 1000)
        if target > self.bar.n:
            self.bar.update(target - self.bar.n)
        else:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@prior_app.command("train")
def train(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="registered dataset name")],
    encoder: Annotated[str, typer.Option(help="taef2, sd-vae, or an autoencoder directory")] = "taef2",
    resolution: Annotated[int | None, typer.Option(help="encode resolution (default: the encoder's policy)")] = None,
    iterations: Annotated[int, typer.Option(help="optimizer steps")] = 2000,
    batch_size: Annotated[int, typer.Option(help="latents per step")] = 128,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (cosine decay, short warm-up)")] = 1e-3,
    layers: Annotated[int, typer.Option(help="transformer blocks")] = 4,
    heads: Annotated[int, typer.Option(help="attention heads")] = 4,
    head_dim: Annotated[int, typer.Option(help="channels per head (hidden size = heads * head_dim)")] = 32,
    patch_size: Annotated[int, typer.Option(help="latent patch size")] = 2,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output directory "
                                             "(default DISTILL_HOME/priors/<dataset>-<encoder>-<res>)")] = None,
    max_per_class: Annotated[int | None, typer.Option(help="train on at most N images per class")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Train a class-conditional latent DiT on DATASET's latents and save it in diffusers format."""
    from distill.cli import user_errors

    with user_errors():
        from distill.config import get_settings
        from distill.runner import resolve_device
        from quantize.prior import PriorConfig, train_prior

        threads = get_settings().num_threads
        if threads:
            import torch

            torch.set_num_threads(threads)
        config = PriorConfig(num_layers=layers, num_attention_heads=heads, attention_head_dim=head_dim,
                             patch_size=patch_size)
        show = not quiet and (sys.stderr.isatty() or bool(os.environ.get("DISTILL_PROGRESS")))
        bar = _TrainBar(show)
        try:
            result = train_prior(
                dataset, encoder, resolution, out, iterations=iterations, batch_size=batch_size, lr=lr,
                max_per_class=max_per_class, config=config, seed=seed, device=resolve_device(device), progress=bar,
            )
        finally:
            bar.close()
        training = result.meta["training"]
        typer.echo(
            f"trained on {training['images']} latents in {result.seconds:.0f}s: held-out loss "
            f"{result.eval_loss_start:.4f} -> {result.eval_loss_end:.4f}", err=True,
        )
        typer.echo(str(result.path))


def register(app: typer.Typer) -> None:
    """Add ``distill prior`` to the main CLI."""
    app.add_typer(prior_app, name="prior")
