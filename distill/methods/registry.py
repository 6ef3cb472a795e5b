"""The one registry of methods. Entries are imported lazily so listing methods stays cheap."""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import ValidationError

from distill.errors import DistillError
from distill.methods.base import Method, MethodParams

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
    """Every method whose module imports (a method under construction is simply not listed)."""
    found = {}
    for name in METHODS:
        try:
            found[name] = get_method(name)
        except (ImportError, AttributeError):
            continue
    return found


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise DistillError(f"unknown method '{name}'; known: {', '.join(METHODS)}")
    module_name, class_name = METHODS[name].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


def parse_params(method: type[Method], values: dict[str, Any]) -> MethodParams:
    """Validate parameters against the method's model; one clear line per problem."""
    try:
        return method.Params.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(p) for p in error["loc"]) or "params"
            if error["type"] == "extra_forbidden":
                known = ", ".join(method.Params.model_fields)
                problems.append(f"unknown parameter '{key}' for {method.name} (known: {known})")
            else:
                problems.append(f"bad value for '{key}': {error['msg']} (got {error.get('input')!r})")
        raise DistillError("; ".join(problems)) from None


def parse_set_options(pairs: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}`` (values are validated by the method's model)."""
    out: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise DistillError(f"--set expects KEY=VALUE, got '{pair}'")
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise DistillError(f"--set expects KEY=VALUE, got '{pair}'")
        out[key] = value
    return out


def params_schema(method: type[Method]) -> dict:
    return method.Params.model_json_schema()
