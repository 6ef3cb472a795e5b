"""Test configuration: real data from DISTILL_DATA_DIR / DISTILL_WEIGHTS_DIR (CI points them at ../shared),
a fresh DISTILL_HOME per test session so caches never leak between runs, and the shared fixtures (real datasets,
the synthetic ImageNet-shaped folder writer)."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
_SHARED = REPO.parent / "shared"
os.environ.setdefault("DISTILL_DATA_DIR", str(_SHARED / "data"))
os.environ.setdefault("DISTILL_WEIGHTS_DIR", str(_SHARED / "weights"))
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Relative DISTILL_* paths (README's test command passes ../shared/...) as the product resolves them, before any
# test copies the environment into a server or a subprocess started from another folder.
from distill.config import absolutize_environment  # noqa: E402

absolutize_environment()


@pytest.fixture(scope="session", autouse=True)
def distill_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = Path(os.environ.get("DISTILL_TEST_HOME") or tmp_path_factory.mktemp("distill-home"))
    os.environ["DISTILL_HOME"] = str(home)
    from distill.config import reload_settings

    reload_settings()
    return home


@pytest.fixture(scope="session")
def mnist():
    from distill.data import get_dataset

    return get_dataset("mnist")


@pytest.fixture(scope="session")
def cifar10():
    from distill.data import get_dataset

    return get_dataset("cifar10")


@pytest.fixture(scope="session")
def synthetic_imagenet() -> ModuleType:
    """bench/synthetic_imagenet.py as a module (registered, so its process pool can pickle its functions)."""
    if "synthetic_imagenet" not in sys.modules:
        spec = importlib.util.spec_from_file_location("synthetic_imagenet", REPO / "bench" / "synthetic_imagenet.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["synthetic_imagenet"] = module
        spec.loader.exec_module(module)
    return sys.modules["synthetic_imagenet"]


@pytest.fixture
def use_data_dir() -> Iterator[Callable[[Path], None]]:
    """Point DISTILL_DATA_DIR elsewhere for one test; restore it (and the cached settings and datasets) after."""
    from distill.config import reload_settings
    from distill.data import registry

    old = os.environ.get("DISTILL_DATA_DIR")

    def point_to(folder: Path) -> None:
        os.environ["DISTILL_DATA_DIR"] = str(folder)
        reload_settings()
        registry.get_dataset.cache_clear()

    yield point_to
    if old is None:
        os.environ.pop("DISTILL_DATA_DIR", None)
    else:
        os.environ["DISTILL_DATA_DIR"] = old
    reload_settings()
    registry.get_dataset.cache_clear()
