"""Build the device kit: what ``bench/gpu_check.py`` needs on the lent GPU machine beyond its image.

    make gpu-kit                                   # = python bench/gpu_kit.py (kit in build/gpu-kit, git-ignored)
    python bench/gpu_kit.py --out DIR --python local   # a kit for this interpreter (the test suite's rehearsal)

The lent machine (Python 3.12, a CUDA build of torch) cannot reach a package registry, and what travels to it
is the working tree plus at most 8 ignored paths, 64 MiB in all. The kit is one ignored folder:

- ``wheels/``: a wheel of every package in :data:`KIT_PACKAGES` (what the check imports that the image lacks:
  diffusers, pydantic, pydantic-settings and what they need), at the version installed here (the tested one),
  for CPython 3.12 manylinux x86-64 (``--python local``: for this interpreter). Ray, FAISS, POT, FastAPI and
  SQLAlchemy are not carried: the check skips the service section without them, uses the torch k-means there,
  and imports the rest lazily.
- ``data/mnist/``: the MNIST files from ``DISTILL_DATA_DIR`` (pixel and DC sections); the check writes its
  synthetic JPEG sets itself.

Wheels already in ``wheels/`` at the wanted version are kept (a rebuilt kit downloads nothing new). The kit's
size and the working tree's are printed; the build fails when together they exceed :data:`LIMIT_MIB`.
``bench/gpu_run.sh`` installs the kit there with ``pip --no-index --no-deps --target`` and runs the check.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIMIT_MIB = 56.0  # the device call carries 64 MiB; the rest is head-room for results-side files and growth

# What bench/gpu_check.py imports that the lent image lacks (the device README's package list, IMAGE_PACKAGES):
# distill.config -> pydantic-settings -> pydantic (+ core, annotated-types, typing-inspection) and python-dotenv;
# the encoders and the DiT -> diffusers -> importlib-metadata. typing-extensions is in the image, but pydantic
# needs a recent one, so the tested version travels (pure Python, tens of KB).
KIT_PACKAGES = ("diffusers", "importlib-metadata", "pydantic", "pydantic-core", "pydantic-settings", "python-dotenv",
                "annotated-types", "typing-inspection", "typing-extensions")

# The lent image's Python packages (the device README, "Python packages already there"): the rehearsal makes
# only these, of what is installed here, visible beside the kit.
IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo
pyre-extensions pygments pyparsing pyproject-hooks pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())

# Known absent from the image (the issue that asked for the kit, and the device README): never emulated as present,
# even where a package of the image requires one of them in the version installed here.
NOT_ON_IMAGE = frozenset({"diffusers", "pydantic", "pydantic-core", "pydantic-settings", "fastapi", "sqlalchemy",
                          "ray", "pot", "faiss-cpu", "faiss-gpu-cu12"})

# pip's platform tags for the lent machine (x86-64 manylinux; pip matches each tag exactly).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_present(folder: Path, name: str, version: str) -> bool:
    stem = re.sub(r"[-_.]+", "_", name).lower()
    return any(p.name.lower().startswith(f"{stem}-{version}-") for p in folder.glob("*.whl"))


def download(name: str, version: str, wheels: Path, python: str) -> None:
    """One wheel, no dependencies (each is named in KIT_PACKAGES), for ``python`` (``local`` or X.Y)."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(wheels), f"{name}=={version}"]
    if python != "local":
        command += ["--python-version", python, "--implementation", "cp"]
        for platform in PLATFORMS:
            command += ["--platform", platform]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["pip failed"]
        raise SystemExit(f"error: no wheel of {name}=={version} for Python {python}: {tail[0]}")


def tree_bytes() -> int:
    """What travels of the working tree: tracked files plus untracked files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    return sum((REPO / p).stat().st_size for p in listed if p and (REPO / p).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build(out: Path, python: str, data_dir: Path | None) -> int:
    wheels = out / "wheels"
    marker = out / "python.txt"  # the Python the wheels are for: another one starts the folder afresh
    if marker.exists() and marker.read_text().strip() != python:
        shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True, exist_ok=True)
    marker.write_text(python + "\n")
    wanted = {normalise(name): importlib.metadata.version(name) for name in KIT_PACKAGES}
    for stale in wheels.glob("*.whl"):  # one version of each package: two would stop the whole install
        name, version = stale.name.split("-")[:2]
        if wanted.get(normalise(name)) != version:
            stale.unlink()
    for name, version in wanted.items():
        if not wheel_present(wheels, name, version):
            download(name, version, wheels, python)
    if data_dir is not None:
        source = data_dir / "mnist"
        if not source.is_dir():
            raise SystemExit(f"error: {source} is not a folder (set DISTILL_DATA_DIR to the folder holding mnist/)")
        target = out / "data" / "mnist"
        target.mkdir(parents=True, exist_ok=True)
        for path in source.iterdir():
            if path.is_file() and not (target / path.name).exists():
                shutil.copyfile(path, target / path.name)
    kit, tree = folder_bytes(out), tree_bytes()
    total = (kit + tree) / 2**20
    print(f"kit {out}: {len(list(wheels.glob('*.whl')))} wheels, {kit / 2**20:.1f} MiB; working tree "
          f"{tree / 2**20:.1f} MiB; together {total:.1f} MiB (limit {LIMIT_MIB:.0f} MiB)")
    if total > LIMIT_MIB:
        print(f"error: kit and working tree together are {total:.1f} MiB, above {LIMIT_MIB:.0f} MiB", file=sys.stderr)
        return 1
    return 0


def _installed_closure(names: frozenset[str]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions among ``names`` and, recursively, what they require (a package of the image
    brings its own dependencies there, whatever version of it is installed here)."""
    from packaging.requirements import Requirement

    installed = {normalise(d.metadata["Name"] or ""): d for d in importlib.metadata.distributions()}
    chosen: dict[str, importlib.metadata.Distribution] = {}
    todo = [n for n in names if n in installed]
    while todo:
        name = todo.pop()
        if name in chosen or name in NOT_ON_IMAGE or name in {normalise(k) for k in KIT_PACKAGES}:
            continue
        chosen[name] = installed[name]
        for line in installed[name].requires or []:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            if normalise(requirement.name) in installed:
                todo.append(normalise(requirement.name))
    return chosen


def image_site(dest: Path) -> Path:
    """A folder of links to the installed distributions that the lent image also has (:data:`IMAGE_PACKAGES`,
    with their dependencies): with ``python -S`` and this folder on ``PYTHONPATH``, an import of anything else
    fails as it would there."""
    dest.mkdir(parents=True, exist_ok=True)
    for dist in _installed_closure(IMAGE_PACKAGES).values():
        base = Path(str(dist.locate_file("")))
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source, link = base / top, dest / top
            if (source.exists() or source.is_symlink()) and not (link.exists() or link.is_symlink()):
                link.symlink_to(source)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "gpu-kit", help="the kit folder (git-ignored)")
    parser.add_argument("--python", default="3.12", help="X.Y of the machine the kit is for, or 'local'")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="the folder holding mnist/ (default: DISTILL_DATA_DIR)")
    parser.add_argument("--no-data", action="store_true", help="wheels only")
    args = parser.parse_args(argv)
    if args.python != "local" and not re.fullmatch(r"3\.\d+", args.python):
        print("error: --python takes X.Y (e.g. 3.12) or 'local'", file=sys.stderr)
        return 2
    data_dir = None
    if not args.no_data:
        data_dir = args.data_dir or (Path(os.environ["DISTILL_DATA_DIR"]) if os.environ.get("DISTILL_DATA_DIR") else None)
        if data_dir is None:
            print("error: set DISTILL_DATA_DIR (or --data-dir) to the folder holding mnist/", file=sys.stderr)
            return 2
    return build(args.out.resolve(), args.python, data_dir)


if __name__ == "__main__":
    sys.exit(main())
