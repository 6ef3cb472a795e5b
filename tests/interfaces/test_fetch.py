"""`distill fetch` against a loopback HTTP mirror: checksums, resume after a cut connection, temp+rename, and
clear instructions when the files cannot be downloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from distill.fetch import SOURCES


class Mirror(BaseHTTPRequestHandler):
    """Serves ``root``; supports ``Range: bytes=N-``; cuts the first response of each file in ``cut`` halfway."""

    root: Path
    cut: set[str]
    requests: list[tuple[str, str | None]]

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.root / self.path.lstrip("/")
        self.requests.append((self.path, self.headers.get("Range")))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if (spec := self.headers.get("Range")) and spec.startswith("bytes="):
            start = int(spec[6:].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in self.cut:
            self.cut.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection drops mid-file
            return
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture()
def mirror(tmp_path: Path) -> Iterator[tuple[str, type[Mirror]]]:
    root = tmp_path / "mirror"
    source = Path(os.environ["DISTILL_DATA_DIR"]) / "mnist"
    shutil.copytree(source, root / "mnist")
    weights = Path(os.environ["DISTILL_WEIGHTS_DIR"]) / "taef2"
    (root / "taef2").mkdir()
    for name in ("taef2_encoder.pth", "taef2_decoder.pth"):
        if (weights / name).exists():
            shutil.copy(weights / name, root / "taef2" / name)
    handler = type("TestMirror", (Mirror,), {"root": root, "cut": set(), "requests": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def fetch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DISTILL_DATA_DIR": str(tmp_path / "data"), "DISTILL_WEIGHTS_DIR": str(tmp_path / "weights")}
    env.pop("DISTILL_FETCH_MIRROR", None)
    distill = Path(sys.executable).with_name("distill")
    return subprocess.run([str(distill), "fetch", *args], env=env, capture_output=True, text=True, timeout=120)


def test_fetch_mnist_resumes_a_cut_download_and_verifies(tmp_path: Path, mirror: tuple[str, type[Mirror]]) -> None:
    url, handler = mirror
    handler.cut.add("/mnist/train-images-idx3-ubyte.gz")
    run = fetch(tmp_path, "mnist", "--mirror", url)
    assert run.returncode == 0, run.stderr
    folder = tmp_path / "data" / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f.name for f in SOURCES["mnist"].files)  # no .part left
    for name in (f.name for f in SOURCES["mnist"].files):
        assert (folder / name).read_bytes() == (Path(os.environ["DISTILL_DATA_DIR"]) / "mnist" / name).read_bytes()
    ranges = [r for p, r in handler.requests if p == "/mnist/train-images-idx3-ubyte.gz"]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")  # resumed, not restarted
    handler.requests.clear()
    again = fetch(tmp_path, "mnist", "--mirror", url)
    assert again.returncode == 0 and handler.requests == []  # verified files are kept, nothing downloaded


def test_fetch_weights(tmp_path: Path, mirror: tuple[str, type[Mirror]]) -> None:
    url, _ = mirror
    if not (Path(os.environ["DISTILL_WEIGHTS_DIR"]) / "taef2" / "taef2_encoder.pth").exists():
        pytest.skip("no TAEF2 weights in DISTILL_WEIGHTS_DIR to serve")
    run = fetch(tmp_path, "taef2", "--mirror", url)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "weights" / "taef2" / "taef2_decoder.pth").stat().st_size > 1_000_000


def test_a_corrupt_file_is_refused_and_removed(tmp_path: Path, mirror: tuple[str, type[Mirror]]) -> None:
    url, handler = mirror
    target = handler.root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(target.read_bytes()[:-10] + b"0123456789")
    run = fetch(tmp_path, "mnist", "--mirror", url)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "t10k-labels-idx1-ubyte.gz: checksum mismatch" in errors[0]
    folder = tmp_path / "data" / "mnist"
    assert not (folder / "t10k-labels-idx1-ubyte.gz").exists() and not list(folder.glob(".*part"))


def test_no_network_says_where_to_put_the_files(tmp_path: Path) -> None:
    run = fetch(tmp_path, "cifar10", "--mirror", "http://127.0.0.1:9")
    assert run.returncode == 2
    assert run.stderr.startswith("error: cannot download http://127.0.0.1:9/cifar10/cifar-10-python.tar.gz")
    assert f"into {tmp_path / 'data' / 'cifar10'}/" in run.stderr and "c58f30108f718f92721af3b95e74349a" in run.stderr
    imagenet = fetch(tmp_path, "imagenet")
    assert imagenet.returncode == 2 and "imagenet/train/n01440764" in imagenet.stderr
    unknown = fetch(tmp_path, "svhn")
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: unknown source 'svhn'")


def test_imagenette_is_the_official_archive_checked_by_size_and_md5(tmp_path: Path,
                                                                    mirror: tuple[str, type[Mirror]]) -> None:
    """A copy that is not fast.ai's imagenette2-160.tgz (here: a small gzip tar) is refused on its size and removed;
    without network the instructions name the file, its md5 and its size."""
    url, handler = mirror
    (handler.root / "imagenette").mkdir()
    with tarfile.open(handler.root / "imagenette" / "imagenette2-160.tgz", "w:gz") as archive:
        archive.add(Path(os.environ["DISTILL_DATA_DIR"]) / "mnist" / "t10k-labels-idx1-ubyte.gz", arcname="x.gz")
    size = (handler.root / "imagenette" / "imagenette2-160.tgz").stat().st_size
    run = fetch(tmp_path, "imagenette", "--mirror", url)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {url}/imagenette/imagenette2-160.tgz: checksum mismatch "
                      f"({size} bytes, expected 99003388); removed the download"]
    assert list((tmp_path / "data" / "imagenette").iterdir()) == []
    offline = fetch(tmp_path, "imagenette", "--mirror", "http://127.0.0.1:9")
    assert offline.returncode == 2 and "https://s3.amazonaws.com/fast-ai-imageclas/" in offline.stderr
    assert "imagenette2-160.tgz  (md5 e793b78cc4c9e9a4ccc0c1155377a412, 99003388 bytes)" in offline.stderr
