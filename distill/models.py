"""Models by name: the method parameters that name model weights (``encoder``, ``prior``, ``sd``, ``dq``'s
``teacher_weights``), the names an operator registered for them, and what a run may load.

On the CLI these parameters may be paths (or hub ids): the user owns the machine. A request from the HTTP API
(``paths=False``) may name only a built-in encoder or a model registered in the settings (``DISTILL_MODELS``,
or ``[models]`` in the TOML config: name -> directory, relative paths under ``DISTILL_WEIGHTS_DIR``); a run
then loads the registered directory, which must hold safetensors weights and no pickle files. The parameter
types (:data:`distill.methods.base.ModelName`, ``RegisteredModel``) enforce this when a request is validated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.config import get_settings
from distill.errors import DistillError

# Method parameters whose value names model weights (quantize's oq and d4m: encoder, prior, sd; dq's teacher).
MODEL_PARAMETERS = ("encoder", "prior", "sd", "teacher_weights")
# The encoders quantize loads by name from <weights_dir>/<name> (taef2's .pth with torch's weights-only loader).
BUILTIN_MODELS = ("taef2", "sd-vae")
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


def registered_models() -> dict[str, Path]:
    """Operator-registered model names -> directories (relative ones under the weights folder)."""
    settings = get_settings()
    weights = settings.weights_dir.expanduser() if settings.weights_dir is not None else None
    out = {}
    for name, folder in settings.models.items():
        folder = folder.expanduser()
        if not folder.is_absolute():
            if weights is None:
                raise DistillError(f"model '{name}' is registered relative to DISTILL_WEIGHTS_DIR, which is not set")
            folder = weights / folder
        out[name] = folder
    return out


def model_names() -> list[str]:
    return [*BUILTIN_MODELS, *(n for n in registered_models() if n not in BUILTIN_MODELS)]


def check_safetensors(name: str, folder: Path) -> None:
    """A registered model is loaded only from safetensors: refuse a directory holding pickle weights."""
    if not folder.is_dir():
        raise DistillError(f"model '{name}' is registered but its directory is missing on this server")
    files = [p for p in folder.rglob("*") if p.is_file()]
    pickles = sorted({p.suffix for p in files if p.suffix in PICKLE_SUFFIXES})
    if pickles:
        raise DistillError(f"model '{name}' holds pickle weights ({', '.join(pickles)}); only safetensors are loaded")
    if not any(p.suffix == ".safetensors" for p in files):
        raise DistillError(f"model '{name}' has no .safetensors weights")


def resolve_models(values: dict[str, Any], *, paths: bool) -> dict[str, str]:
    """The model parameters to replace before a run: registered names become their directories (checked for
    safetensors when the request came over HTTP, ``paths=False``); built-in names stay names; other values
    are paths (CLI only)."""
    registered = registered_models()
    out: dict[str, str] = {}
    for key in MODEL_PARAMETERS:
        value = values.get(key)
        if not isinstance(value, str):
            continue
        if value in BUILTIN_MODELS:
            weights = get_settings().weights_dir
            if not paths and value != "taef2" and weights is not None:  # taef2: .pth read by the weights-only loader
                check_safetensors(value, weights.expanduser() / value)
            continue
        if value in registered:
            if not paths:
                check_safetensors(value, registered[value])
            out[key] = str(registered[value])
        elif not paths:
            raise DistillError(f"{key} '{value[:64]}' is not a model registered on this server")
    return out
