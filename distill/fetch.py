"""``distill fetch NAME``: download a dataset or weights into DISTILL_DATA_DIR / DISTILL_WEIGHTS_DIR.

Each file is checked against a published checksum (docs/DATA-SOURCES.md names where each comes from),
resumes with an HTTP Range request after a broken transfer (bytes go to ``.<name>.part`` first) and is
renamed into place only once verified. The ``fetch_mirror`` setting (``DISTILL_FETCH_MIRROR``, or
``--mirror``) replaces every source's base URL with ``MIRROR/<name>/`` for hosts that keep their own copies
(and for the tests, which serve the files from loopback). Without network, :func:`manual_instructions` says
where to put the files by hand.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import httpx
import typer

from distill.errors import DistillError


@dataclass(frozen=True)
class RemoteFile:
    name: str
    md5: str | None = None  # of the file as published
    content_md5: str | None = None  # of its gunzipped content (mirrors of MNIST recompress; the content is canonical)
    sha256: str | None = None
    size: int | None = None  # bytes, where published
    head_md5: str | None = None  # of the first MiB (fast.ai's own check for its archives)

    def check(self, path: Path) -> str | None:
        """None if ``path`` matches every published check, else what is wrong (the size first: the cheapest)."""
        if self.size is not None and (got_size := path.stat().st_size) != self.size:
            return f"{got_size} bytes, expected {self.size}"
        if self.head_md5 and (got := _digest(path, "md5", limit=1 << 20)) != self.head_md5:
            return f"md5 of the first MiB {got}, expected {self.head_md5}"
        if self.sha256 and (got := _digest(path, "sha256")) != self.sha256:
            return f"sha256 {got}, expected {self.sha256}"
        if self.md5 and (got := _digest(path, "md5")) != self.md5:
            return f"md5 {got}, expected {self.md5}"
        if self.content_md5:
            try:
                got = _digest(path, "md5", gunzip=True)
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                return f"not a gzip file ({exc})"
            if got != self.content_md5:
                return f"md5 of the content {got}, expected {self.content_md5}"
        return None


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # "data" (DISTILL_DATA_DIR) or "weights" (DISTILL_WEIGHTS_DIR)
    folder: str
    base_url: str
    files: tuple[RemoteFile, ...]
    about: str
    aliases: tuple[str, ...] = field(default=())


IDX = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("mnist", "data", "mnist", "https://ossci-datasets.s3.amazonaws.com/mnist/", tuple(
        RemoteFile(name, content_md5=md5) for name, md5 in zip(IDX, (
            "6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624",
            "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637"), strict=True)),
        "MNIST (LeCun, Cortes, Burges), the four IDX files, about 11 MB"),
    Source("fashion-mnist", "data", "fashion-mnist", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", tuple(
        RemoteFile(name, content_md5=md5) for name, md5 in zip(IDX, (
            "f4a8712d7a061bf5bd6d2ca38dc4d50a", "9018921c3c673c538a1fc5bad174d6f9",
            "8181f5470baa50b63fa0f6fddb340f0a", "15d484375f8d13e6eb1aabb0c3f46965"), strict=True)),
        "Fashion-MNIST (Zalando, MIT), the four IDX files, about 30 MB; Debian: apt-get install dataset-fashion-mnist"),
    Source("cifar10", "data", "cifar10", "https://www.cs.toronto.edu/~kriz/",
           (RemoteFile("cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a"),),
           "CIFAR-10 (Krizhevsky), python pickles, 163 MB"),
    Source("cifar100", "data", "cifar100", "https://www.cs.toronto.edu/~kriz/",
           (RemoteFile("cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85"),),
           "CIFAR-100 (Krizhevsky), python pickles, 161 MB"),
    Source("imagenette", "data", "imagenette", "https://s3.amazonaws.com/fast-ai-imageclas/",
           (RemoteFile("imagenette2-160.tgz", md5="e793b78cc4c9e9a4ccc0c1155377a412", size=99_003_388,
                       head_md5="c475f8f7617a200ba35b9facc48443c3"),),
           "Imagenette (fast.ai), 10 ImageNet classes, images with a 160 px short side, 99 MB; read as the tarball"),
    Source("taef2", "weights", "taef2", "https://github.com/madebyollin/taesd/raw/main/", (
        RemoteFile("taef2_encoder.pth", sha256="10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6"),
        RemoteFile("taef2_decoder.pth", sha256="0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5"),
    ), "TAEF2 tiny autoencoder for the FLUX.2 latent space (Ollin Boer Bohan, MIT), 2 x 2.7 MB"),
)}

IMAGENET_LAYOUT = """\
ImageNet-1K cannot be downloaded without an account: get ILSVRC2012 from image-net.org and lay it out as
  $DISTILL_DATA_DIR/imagenet/train/n01440764/*.JPEG   (1000 wnid folders, 1.28M images)
  $DISTILL_DATA_DIR/imagenet/val/n01440764/*.JPEG     (the 50,000 validation images sorted into wnid folders)
Class order is the sorted wnid order (as torchvision's ImageFolder); any other ImageFolder tree works with
`distill run METHOD --dataset imagefolder:PATH`."""


def _digest(path: Path, algorithm: str, gunzip: bool = False, limit: int | None = None) -> str:
    """Hex digest of the file (its gunzipped content with ``gunzip``; its first ``limit`` bytes with ``limit``)."""
    h = hashlib.new(algorithm)
    opener = gzip.open if gunzip else open
    with opener(path, "rb") as handle:
        if limit is not None:
            h.update(handle.read(limit))
            return h.hexdigest()
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def target_dir(source: Source) -> Path:
    from distill.config import get_settings

    settings = get_settings()
    root = settings.data_dir if source.kind == "data" else settings.weights_dir
    variable = "DISTILL_DATA_DIR" if source.kind == "data" else "DISTILL_WEIGHTS_DIR"
    if root is None:
        raise DistillError(f"{variable} is not set: point it at the folder to fetch {source.name} into")
    return root.expanduser() / source.folder


def base_url(source: Source, mirror: str | None = None) -> str:
    from distill.config import get_settings

    mirror = mirror or get_settings().fetch_mirror
    return f"{mirror.rstrip('/')}/{source.folder}/" if mirror else source.base_url


def manual_instructions(source: Source, folder: Path | None = None) -> str:
    variable = "DISTILL_DATA_DIR" if source.kind == "data" else "DISTILL_WEIGHTS_DIR"
    where = str(folder) if folder else f"${variable}/{source.folder}"
    lines = [f"to install {source.name} by hand, download these files from {source.base_url} into {where}/:"]
    for f in source.files:
        check = f"sha256 {f.sha256}" if f.sha256 else f"md5 {f.md5}" if f.md5 else f"gunzipped md5 {f.content_md5}"
        size = f", {f.size} bytes" if f.size is not None else ""
        lines.append(f"  {f.name}  ({check}{size})")
    lines.append(f"then run `distill fetch {source.name}` again to check them (it keeps verified files).")
    return "\n".join(lines)


Progress = Callable[[str, int, int | None], None]


def fetch(name: str, *, mirror: str | None = None, progress: Progress | None = None,
          client: httpx.Client | None = None, attempts: int = 4) -> list[Path]:
    """Download the files of ``name`` that are missing or wrong; return the verified paths."""
    if name == "imagenet":
        raise DistillError(IMAGENET_LAYOUT)
    if name not in SOURCES:
        raise DistillError(f"unknown source '{name}'; known: {', '.join(SOURCES)}, imagenet (instructions only)")
    source = SOURCES[name]
    folder = target_dir(source)
    folder.mkdir(parents=True, exist_ok=True)
    base = base_url(source, mirror)
    own = client is None
    http = client or httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30.0, read=120.0),
                                  headers={"User-Agent": "distill-fetch"})
    done: list[Path] = []
    try:
        for remote in source.files:
            target = folder / remote.name
            if target.exists() and remote.check(target) is None:
                done.append(target)
                continue
            part = folder / f".{remote.name}.part"
            url = base + remote.name
            for attempt in range(1, attempts + 1):
                try:
                    _download(http, url, part, remote.name, progress)
                    break
                except httpx.HTTPStatusError as exc:
                    part.unlink(missing_ok=True)
                    raise DistillError(f"{url}: HTTP {exc.response.status_code}\n{manual_instructions(source, folder)}") from None
                except httpx.TransportError as exc:
                    if attempt == attempts:
                        raise DistillError(f"cannot download {url}: {exc}\n{manual_instructions(source, folder)}") from None
                    time.sleep(min(2 ** attempt, 10))
            problem = remote.check(part)
            if problem is not None:
                part.unlink(missing_ok=True)
                raise DistillError(f"{url}: checksum mismatch ({problem}); removed the download")
            os.replace(part, target)
            done.append(target)
    finally:
        if own:
            http.close()
    return done


def _download(http: httpx.Client, url: str, part: Path, label: str, progress: Progress | None) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with http.stream("GET", url, headers=headers) as response:
        if response.status_code == 416:  # the part file is already complete (or bigger than the file)
            return
        response.raise_for_status()
        resumed = response.status_code == 206
        length = response.headers.get("content-length")
        total = (int(length) + (have if resumed else 0)) if length and length.isdigit() else None
        written = have if resumed else 0
        with open(part, "ab" if resumed else "wb") as handle:
            for chunk in response.iter_bytes(1 << 20):
                handle.write(chunk)
                written += len(chunk)
                if progress is not None:
                    progress(label, written, total)


class _Printer:
    """A tqdm bar per file on a terminal; otherwise one line per file and every 10 s."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.bar = None
        self.label: str | None = None
        self.last = 0.0

    def __call__(self, label: str, done: int, total: int | None) -> None:
        if self.tty:
            from tqdm import tqdm

            if label != self.label:
                self.close()
                self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=label, leave=False, file=sys.stderr)
                self.label = label
            assert self.bar is not None
            self.bar.update(done - self.bar.n)
            return
        now = time.monotonic()
        if label != self.label or now - self.last >= 10 or (total and done >= total):
            self.label, self.last = label, now
            share = f" {100 * done / total:.0f}%" if total else ""
            print(f"{label}: {done / 1e6:.1f} MB{share}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def register(app: typer.Typer) -> None:
    def fetch_command(
        names: Annotated[list[str], typer.Argument(help=f"{', '.join(SOURCES)} (imagenet: prints how to lay it out)")],
        mirror: Annotated[str | None, typer.Option(help="base URL holding NAME/FILE copies (DISTILL_FETCH_MIRROR)")] = None,
    ) -> None:
        """Download datasets and weights into DISTILL_DATA_DIR / DISTILL_WEIGHTS_DIR (checksummed, resumable)."""
        for name in names:
            printer = _Printer()
            try:
                paths = fetch(name, mirror=mirror, progress=printer)
            except DistillError as exc:
                printer.close()
                first, *rest = str(exc).splitlines() or [""]
                typer.echo(f"error: {first}", err=True)
                for line in rest:
                    typer.echo(line, err=True)
                raise typer.Exit(2) from None
            printer.close()
            typer.echo(f"{name}: {len(paths)} files verified in {paths[0].parent if paths else '-'}")

    app.command("fetch")(fetch_command)
