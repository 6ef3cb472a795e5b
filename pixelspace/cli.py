"""``distill experts ...``: train and list the expert-trajectory buffers that MTT and DATM reuse."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from distill.errors import DistillError

experts_app = typer.Typer(add_completion=False, no_args_is_help=True,
                          help="Expert trajectories for trajectory matching (mtt, datm).")


@experts_app.command("train")
def train(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="registered dataset")],
    experts: Annotated[int, typer.Option("--experts", help="number of expert trajectories (reference: 100)")],
    epochs: Annotated[int, typer.Option("--epochs", help="epochs per expert (reference: 50; DATM 100)")],
    model: Annotated[str, typer.Option("--model", help="network (ConvNet-3 IN in the reference)")] = "convnet",
    max_per_class: Annotated[int | None, typer.Option("--max-per-class", help="train on at most N images per class "
                                                      "(use the same value for `distill run`)")] = None,
    lr_teacher: Annotated[float, typer.Option("--lr-teacher", help="expert SGD lr (momentum 0, no decay)")] = 0.01,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Train (or extend) the expert buffer under DISTILL_HOME/experts; an existing buffer is reused."""
    try:
        from distill.data.registry import check_ipc, get_dataset
        from distill.methods.base import RunContext
        from distill.runner import resolve_device
        from pixelspace.experts import ExpertSettings, ensure_buffer, experts_to_train

        ds = get_dataset(dataset)
        check_ipc(ds, 1, max_per_class)
        settings = ExpertSettings(dataset=ds.name, model=model, epochs=epochs, lr_teacher=lr_teacher,
                                  max_per_class=max_per_class)
        settings.validate()
        ctx = RunContext(dataset=ds, ipc=1, device=resolve_device(device), max_per_class=max_per_class)
        total = experts_to_train(settings, experts) * epochs
        bar = None
        if not quiet and total:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="expert epochs", dynamic_ncols=True)
        buffer = ensure_buffer(ds, ctx.train, settings, experts, ctx.device, log=lambda m: typer.echo(m, err=True),
                               tick=bar.update if bar is not None else None)
        if bar is not None:
            bar.close()
        accs = [e["test_accuracy"] for e in buffer.manifest["experts"]]
        typer.echo(f"{buffer.folder}: {buffer.num_experts} experts x {buffer.epochs} epochs, "
                   f"mean test accuracy {sum(accs) / len(accs):.2f}%")
    except DistillError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@experts_app.command("list")
def list_(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the stored expert buffers."""
    from pixelspace.experts import list_buffers

    rows = list_buffers()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        cap = row["max_per_class"] or "all"
        typer.echo(f"{row['dataset']:<14} {row['model']:<10} experts {row['experts']:>3}  epochs {row['epochs']:>3}  "
                   f"per-class {cap:<6} acc {row['mean_test_accuracy']:.2f}%  {row['path']}")


def register(app: typer.Typer) -> None:
    app.add_typer(experts_app, name="experts")
