"""Settings from the environment (``DISTILL_*``) or a TOML config file (``DISTILL_CONFIG``).

Nothing in the code knows where data or weights live on a given machine: it asks these settings.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from distill.errors import DistillError

# Settings that name a path on this host. A relative value means "relative to where it was given": the working
# directory for the environment, the file's folder for a TOML config.
PATH_VARIABLES = ("DISTILL_CONFIG", "DISTILL_HOME", "DISTILL_DATA_DIR", "DISTILL_WEIGHTS_DIR", "DISTILL_FASHION_MNIST_DIR")
PATH_FIELDS = ("home", "data_dir", "weights_dir", "fashion_mnist_dir")
_SQLITE = "sqlite:///"


def absolutize_environment(environ: MutableMapping[str, str] | None = None) -> None:
    """Rewrite relative ``DISTILL_*`` paths (and a relative SQLite URL) in the environment as absolute ones.

    Done once, when the product is imported, so that every process it starts later (a server, its workers, Ray
    tasks, the subprocesses of tests and benches) inherits the absolute form instead of reading the relative one
    again from another working directory.
    """
    env = os.environ if environ is None else environ
    for name in PATH_VARIABLES:
        value = env.get(name)
        if value and not value.startswith("~") and not os.path.isabs(value):
            env[name] = os.path.abspath(value)
    for name in ("DISTILL_DATABASE_URL", "DATABASE_URL"):
        url = env.get(name, "")
        if url.startswith(_SQLITE):
            path = url[len(_SQLITE):]
            if path and not path.startswith(("/", ":memory:")) and "?" not in path:
                env[name] = _SQLITE + os.path.abspath(path)


absolutize_environment()


class _TomlRelativeToFile(TomlConfigSettingsSource):
    """A TOML config whose relative paths are read against the file's own folder, not the working directory."""

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        data = super()._read_file(file_path)
        folder = Path(str(file_path)).resolve().parent
        for name in PATH_FIELDS:
            value = data.get(name)
            if isinstance(value, str) and not value.startswith("~") and not os.path.isabs(value):
                data[name] = str(folder / value)
        return data


def config_file() -> Path | None:
    """The TOML config in force: DISTILL_CONFIG, else DISTILL_HOME/config.toml when it exists."""
    explicit = os.environ.get("DISTILL_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    home = Path(os.environ.get("DISTILL_HOME", "~/.distillery")).expanduser()
    candidate = home / "config.toml"
    return candidate if candidate.exists() else None


NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")  # a registered dataset or model name: never a path


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILL_", extra="ignore")

    data_dir: Path | None = Field(default=None, description="Folder holding one sub-folder per dataset (mnist/, cifar10/ ...)")
    weights_dir: Path | None = Field(default=None, description="Folder holding pretrained weights (taef2/, sd-vae/ ...)")
    home: Path = Field(default=Path("~/.distillery"), description="State: database, artifacts, caches")
    fashion_mnist_dir: Path = Field(default=Path("/usr/share/datasets/fashion-mnist"), description="Debian's Fashion-MNIST")
    num_threads: int | None = Field(default=None, description="torch CPU threads; default: all cores")
    keep_heap: bool = Field(default=True, description="`distill run` / `distill eval`: keep freed memory in the "
                            "process (glibc mallopt) rather than hand every large tensor back to the kernel and "
                            "fault it in again; 0.65x a CPU evaluation's wall time here, at a 1.5x peak RSS")
    fetch_mirror: str | None = Field(default=None, description="`distill fetch`: base URL holding NAME/FILE copies")
    loader_workers: int | None = Field(default=None, ge=0, description="image decode processes of the streaming "
                                       "loader; default: the cores available; 0 = in-process")
    autoencoder_memory_gb: float = Field(default=4.0, gt=0, description="activation memory of one VAE encode/"
                                         "decode batch on the CPU: the method's batch_size is lowered to fit (SD's "
                                         "VAE at 256 px needs about 170 MB per image in fp32); on CUDA half the "
                                         "free device memory")
    realpool_cache_bytes: int = Field(default=4 * 2**30, ge=0, description="pixel-space methods: decoded real "
                                      "training images kept in RAM, in bytes. A (capped) training split that fits is "
                                      "loaded whole at the start; a larger one (ImageNet) is read per batch through "
                                      "the split's loader, with an LRU of recently drawn images of this size")
    datasets: dict[str, Path] = Field(
        default_factory=dict,
        description="Operator-registered ImageFolder datasets, name -> tree or tarball (relative: under data_dir); "
                    "requests (HTTP and CLI) name them like the built-in datasets",
    )
    models: dict[str, Path] = Field(
        default_factory=dict,
        description="Operator-registered models, name -> directory (relative: under weights_dir); HTTP clients "
                    "name models (encoder, prior, sd) only from these and the built-in encoders",
    )

    @field_validator("datasets", "models")
    @classmethod
    def _plain_names(cls, value: dict[str, Path]) -> dict[str, Path]:
        bad = [name for name in value if not NAME.match(name)]
        if bad:
            raise ValueError(f"names must match {NAME.pattern}: {', '.join(bad)}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = config_file()
        if path is not None and path.exists():
            sources.append(_TomlRelativeToFile(settings_cls, toml_file=path))
        return tuple(sources)

    @property
    def home_dir(self) -> Path:
        return self._state_dir(self.home.expanduser())

    @property
    def cache_dir(self) -> Path:
        return self._state_dir(self.home_dir / "cache")

    @property
    def artifacts_dir(self) -> Path:
        return self._state_dir(self.home_dir / "artifacts")

    def _state_dir(self, path: Path) -> Path:
        """A folder under DISTILL_HOME, created if needed; one that cannot be created or written is a
        :class:`DistillError` naming DISTILL_HOME (one line from every command), not a traceback from the first
        cache or database write."""
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DistillError(f"DISTILL_HOME {self.home} is not writable: {exc.strerror or exc}") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise DistillError(f"DISTILL_HOME {self.home} is not writable: permission denied on {path.name}/")
        return path


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings from the environment; a malformed value is one line naming its variable (DistillError)."""
    absolutize_environment()
    try:
        return Settings()
    except ValidationError as exc:
        problem = exc.errors()[0]
        name = "DISTILL_" + "_".join(str(part) for part in problem["loc"]).upper()
        raise DistillError(f"setting {name}={problem.get('input')!r}: {problem['msg']}") from None


def reload_settings() -> Settings:
    """Drop the cached settings (tests change the environment)."""
    get_settings.cache_clear()
    return get_settings()
