"""A method's hard requirements on this host, checked before any work: Python packages that a parameter value
needs (FAISS, diffusers, scikit-learn ...) and model weights that must be in the weights folder.

One table for every method, read by the submit check (:func:`distill.runner.check_request`, a 4xx over HTTP,
one error line on the CLI), by ``GET /methods`` (available, or why not) and by ``distill serve`` at start-up.
Only what a job would otherwise discover after minutes of work belongs here; a dataset's presence is the
dataset registry's check.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distill.errors import Problem, problem


@dataclass(frozen=True)
class Need:
    """``what`` is needed when parameter ``key`` has a value that ``when`` accepts; ``explicit``: only when the
    request set that value itself (a default may be resolved at run time, e.g. a backend chosen by what is
    installed)."""

    key: str
    when: Callable[[Any], bool]
    packages: tuple[str, ...] = ()
    weights: str | None = None
    explicit: bool = False

    def describe(self, value: Any) -> str:
        parts = [f"the Python package {p}" for p in self.packages]
        if self.weights:
            parts.append(f"the {self.weights} weights in DISTILL_WEIGHTS_DIR/{self.weights}")
        return f"{self.key}={value} needs " + " and ".join(parts)


QUANTIZE_NEEDS = (
    Need("kmeans_backend", lambda v: v == "faiss", packages=("faiss",), explicit=True),
    Need("kmeans_backend", lambda v: isinstance(v, str) and v.startswith("sklearn"), packages=("sklearn",)),
    Need("encoder", lambda v: v in ("taef2", "sd-vae"), packages=("diffusers",)),
    Need("encoder", lambda v: v == "taef2", weights="taef2"),
    Need("encoder", lambda v: v == "sd-vae", weights="sd-vae"),
    Need("decode", lambda v: v == "diffusion", packages=("diffusers",)),
    Need("decode", lambda v: v == "sd-img2img", packages=("diffusers", "transformers")),
)
NEEDS: dict[str, tuple[Need, ...]] = {"oq": QUANTIZE_NEEDS, "d4m": QUANTIZE_NEEDS}


def _has_package(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _has_weights(name: str) -> bool:
    from distill.config import get_settings

    folder = get_settings().weights_dir
    if folder is None:
        return False
    folder = folder.expanduser() / name
    if name == "taef2":
        return all((folder / f"taef2_{part}.pth").is_file() for part in ("encoder", "decoder"))
    return folder.is_dir()


def missing(method: str, given: dict[str, Any], effective: dict[str, Any]) -> list[tuple[str, str]]:
    """(parameter, what is missing) for a request: ``given`` are the values the request set, ``effective``
    the parameters with their defaults."""
    out: list[tuple[str, str]] = []
    for need in NEEDS.get(method, ()):
        source = given if need.explicit else effective
        if need.key not in source or not need.when(source[need.key]):
            continue
        lacking = [p for p in need.packages if not _has_package(p)]
        weights_missing = need.weights is not None and not _has_weights(need.weights)
        if lacking or weights_missing:
            out.append((need.key, need.describe(source[need.key]) + " (missing here)"))
    return out


def requirement_problems(method: str, given: dict[str, Any], effective: dict[str, Any]) -> list[Problem]:
    return [problem(["params", key], message, "value_error.requirement_missing")
            for key, message in missing(method, given, effective)]


def method_requirements(method: str, defaults: dict[str, Any]) -> tuple[list[str], str | None]:
    """(what the method needs with its defaults, why it cannot run here or None)."""
    needs = []
    for need in NEEDS.get(method, ()):
        if need.explicit or need.key not in defaults or not need.when(defaults[need.key]):
            continue
        needs += [f"package {p}" for p in need.packages]
        if need.weights:
            needs.append(f"weights {need.weights}")
    lacking = missing(method, {}, defaults)
    return needs, ("; ".join(message for _, message in lacking) or None)
