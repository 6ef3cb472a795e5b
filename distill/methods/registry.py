"""The one registry of methods. Entries are imported lazily so listing methods stays cheap."""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import ValidationError

from distill.errors import InvalidRequest, MethodUnavailable, Problem, problem
from distill.methods.base import QUOTING_ERRORS, Method, MethodParams

# name -> "module:Class". Each class declares its Params (defaults from its paper) and run(ctx, params).
METHODS: dict[str, str] = {
    "random": "distill.methods.baselines:RandomSelection",
    "herding": "distill.methods.baselines:Herding",
    "kcenter": "distill.methods.baselines:KCenter",
    "oq": "quantize.methods:LatentOptimalQuantization",
    "d4m": "quantize.methods:D4M",
    "dd": "pixelspace.dd:DatasetDistillation",
    "dc": "pixelspace.gradient_matching:DatasetCondensation",
    "dsa": "pixelspace.gradient_matching:SiameseAugmentedCondensation",
    "dm": "pixelspace.dm:DistributionMatching",
    "mtt": "pixelspace.mtt:TrajectoryMatching",
    "datm": "pixelspace.datm:DifficultyAlignedTrajectoryMatching",
    "dq": "pixelspace.dq:DatasetQuantization",
}


def available_methods() -> dict[str, type[Method]]:
    """Every registered method. One that cannot be imported is an error naming what is missing, never a
    silently shorter list."""
    return {name: get_method(name) for name in METHODS}


def unknown_method(name: str) -> Problem:
    return problem(["method"], f"unknown method '{name}'; known: {', '.join(METHODS)}", "value_error.unknown_method")


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise InvalidRequest([unknown_method(name)])
    module_name, class_name = METHODS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name or module_name
        raise MethodUnavailable(f"method '{name}' needs {missing}: {type(exc).__name__}: {exc}") from exc
    try:
        method: type[Method] = getattr(module, class_name)
    except AttributeError as exc:
        raise MethodUnavailable(f"method '{name}': {module_name} has no class {class_name}") from exc
    return method


def param_problems(method: type[Method], values: dict[str, Any], *,
                   paths: bool = False) -> tuple[MethodParams | None, list[Problem]]:
    """The method's parameters validated against its model, or every problem (``loc`` under ``params``).

    The one validation of method parameters. ``paths=False`` (HTTP requests, and the default): JSON types as
    given (strict: no ``"100"`` for an integer, no ``true`` for a number) and model parameters name registered
    models only. ``paths=True`` (the CLI, whose ``--set`` values are strings): values are converted, and model
    parameters may be paths on this machine.
    """
    try:
        return method.Params.model_validate(values, strict=None if not paths else False,
                                            context={"paths": paths}), []
    except ValidationError as exc:
        problems: list[Problem] = []
        for error in exc.errors():
            loc: list[str | int] = ["params", *error["loc"]]
            key = ".".join(str(p) for p in error["loc"]) or "params"
            if error["type"] == "extra_forbidden":
                known = ", ".join(method.Params.model_fields)
                msg = f"unknown parameter '{_shown(key)}' for {method.name} (known: {known})"
            elif error["type"] in QUOTING_ERRORS:
                msg = f"bad value for '{key}': {error['msg']}"
            else:
                msg = f"bad value for '{key}': {error['msg']} (got {_shown(repr(error.get('input')))})"
            problems.append(problem(loc, msg, error["type"]))
        return None, problems


def _shown(text: str, limit: int = 80) -> str:
    """A client's value quoted back in an error, cut short (a 60 KB string is not echoed)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_params(method: type[Method], values: dict[str, Any], *, paths: bool = False) -> MethodParams:
    """Validate parameters against the method's model (:func:`param_problems`); :class:`InvalidRequest` lists
    every problem."""
    params, problems = param_problems(method, values, paths=paths)
    if problems or params is None:
        raise InvalidRequest(problems)
    return params


def parse_set_options(pairs: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}`` (values are validated by the method's model)."""
    out: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise InvalidRequest([problem(["params"], f"--set expects KEY=VALUE, got '{pair}'", "value_error.set_syntax")])
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise InvalidRequest([problem(["params"], f"--set expects KEY=VALUE, got '{pair}'", "value_error.set_syntax")])
        out[key] = value
    return out


def params_schema(method: type[Method]) -> dict:
    return method.Params.model_json_schema()
