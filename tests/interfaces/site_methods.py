"""An operator's method plugin, loaded by the test server through DISTILL_PLUGINS: ``random`` with one parameter
that only has an effect on a CUDA GPU (TF32 matmuls, an Ampere-and-newer CUDA feature), marked so that GET
/methods, the web form and `distill methods` set it apart on a host without a GPU."""

from __future__ import annotations

from pydantic import Field

from distill.methods.base import only_on
from distill.methods.baselines import RandomParams, RandomSelection
from distill.methods.registry import METHODS


class SiteParams(RandomParams):
    tf32: bool = Field(False, description="allow TF32 matmuls (CUDA GPUs from Ampere on)",
                       json_schema_extra=only_on("cuda"))


class SiteRandom(RandomSelection):
    name = "site-random"
    summary = "random selection, as a site plugin with a GPU-only switch"
    Params = SiteParams  # type: ignore[assignment]


METHODS["site-random"] = f"{__name__}:SiteRandom"
