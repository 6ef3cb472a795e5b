"""Methods: the contract (``base``), the registry and the selection baselines."""

from distill.methods.base import DistilledSet, Method, MethodParams, RunContext
from distill.methods.registry import METHODS, available_methods, get_method, parse_params

__all__ = ["METHODS", "DistilledSet", "Method", "MethodParams", "RunContext", "available_methods", "get_method", "parse_params"]
