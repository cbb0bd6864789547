"""Downloads on first use (regdit.storage.downloads): the Inception weights and ADM's reference
batches, served by an HTTP server on 127.0.0.1 that the test starts, fetched by the real download
code, checked, cached and reused."""
import collections
import concurrent.futures
import functools
import hashlib
import http.server
import io
import re
import socket
import sys
import threading
import time
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import cli_error
from huggingface_hub import constants

from regdit import RegditError
from regdit.commands.cli import main as cli_main
from regdit.commands.evaluate import (
    inception_weights_path,
    reference_batch_path,
    save_random_inception_weights,
)
from regdit.storage import downloads
from regdit.storage.downloads import CHUNK


class Files(http.server.SimpleHTTPRequestHandler):
    """Serves its folder, counting the requests of each path in `requests`; a file whose name starts
    with `short-` is announced 100 bytes longer than it is, one starting with `stall-` stops after
    its first 1000 bytes for 2 s, `trickle-` sends a byte every 10 ms, `slow-` waits 1 s before its
    body. `endless-NAME` streams zeros without end and without a length, `drop-NAME` sends 1000
    bytes of a chunked body and closes the connection, `loop-NAME` redirects to itself."""

    requests = collections.Counter()

    def do_GET(self):
        name = self.path.rpartition("/")[2]
        self.requests[self.path] += 1
        if name.startswith("loop-"):
            self.send_response(302)
            self.send_header("Location", self.path)
            self.end_headers()
        elif name.startswith(("endless-", "drop-")):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while True:  # until the client gives up
                self.wfile.write(b"%x\r\n%s\r\n" % (CHUNK, bytes(CHUNK)))
                if name.startswith("drop-"):
                    self.wfile.write(b"%x\r\n" % CHUNK + bytes(1000))
                    return
        else:
            super().do_GET()

    def send_header(self, keyword, value):
        if keyword == "Content-Length" and self.path.rpartition("/")[2].startswith("short-"):
            value = str(int(value) + 100)
        super().send_header(keyword, value)

    def copyfile(self, source, outputfile):
        name = self.path.rpartition("/")[2]
        if name.startswith("stall-"):
            outputfile.write(source.read(1000))
            outputfile.flush()
            time.sleep(2)
        if name.startswith("slow-"):
            time.sleep(1)
        while name.startswith("trickle-") and (byte := source.read(1)):
            outputfile.write(byte)
            outputfile.flush()
            time.sleep(0.01)
        super().copyfile(source, outputfile)

    def log_message(self, *args):
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    """Says nothing when a client hangs up mid-body: the downloads under test give up on purpose."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def server(tmp_path):
    """(base URL, the folder it serves, stop): an HTTP server on 127.0.0.1, in a thread."""
    folder = tmp_path / "served"
    folder.mkdir()
    httpd = QuietServer(("127.0.0.1", 0),
                                            functools.partial(Files, directory=str(folder)))
    # polled every 50 ms rather than 0.5 s: shutdown() waits for a poll
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()

    def stop():
        httpd.shutdown()
        httpd.server_close()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder, stop
    if thread.is_alive():
        stop()


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty download caches in tmp_path (TORCH_HOME for the torch hub, REGDIT_CACHE), online, no
    weights set."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("REGDIT_CACHE", str(tmp_path / "regdit-cache"))
    monkeypatch.delenv("REGDIT_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path / "torch" / "hub" / "checkpoints", tmp_path / "regdit-cache" / "ref_batches"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random Inception weights named as torch.hub names a file, with the prefix of its own
    SHA-256."""
    path = save_random_inception_weights(tmp_path_factory.mktemp("inception") / "weights.pth")
    return path.read_bytes()


def sha256_named(folder, data, stem="weights-inception-test"):
    name = f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    (folder / name).write_bytes(data)
    return name


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # the Inception weights through a local server, then an evaluation
def test_inception_weights_download_on_first_use_then_come_from_the_cache(
        server, caches, weights, monkeypatch, tmp_path, capsys):
    url, folder, stop = server
    name = sha256_named(folder, weights)
    monkeypatch.setattr(downloads, "INCEPTION_URL", f"{url}/{name}")
    np.savez(tmp_path / "images.npz",
             arr_0=np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), np.uint8))
    cli_main(["eval", "--make-ref", str(tmp_path / "images.npz"),
              "--output", str(tmp_path / "ref.npz"), "--device", "cpu"])
    cached = caches[0] / name
    assert (f"downloading the Inception weights from {url}/{name} to {cached}\n"
            in capsys.readouterr().err)
    assert cached.read_bytes() == weights and sorted(p.name for p in caches[0].iterdir()) == [name]
    # the weights computed the statistics
    assert np.load(tmp_path / "ref.npz")["mu"].shape == (2048,)
    stop()  # a second use needs no network
    assert inception_weights_path() == str(cached)
    assert "downloading" not in capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    ("flip", r"has SHA-256 [0-9a-f]{8}\.\.\., not [0-9a-f]{8}\.\.\. as its name says"),
    ("short", r"ended after \d+ of \d+ bytes"),
], ids=["hash", "truncated"])
def test_a_damaged_inception_download_is_refused_and_removed(server, caches, weights, monkeypatch,
                                                             damage, message):
    url, folder, _ = server
    name = sha256_named(folder, weights, stem="short-weights" if damage == "short" else "weights")
    if damage == "flip":
        (folder / name).write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))
    monkeypatch.setattr(downloads, "INCEPTION_URL", f"{url}/{name}")
    with pytest.raises(RegditError) as error:
        inception_weights_path()
    source, destination = re.escape(f"{url}/{name}"), re.escape(str(caches[0] / name))
    assert re.fullmatch(rf"the download of the Inception weights from {source} {message}, "
                        rf"so it was removed: run again, or download {source} on a machine "
                        rf"with network and put it at {destination} \(or pass "
                        rf"--inception-weights PATH\)", str(error.value))
    assert list(caches[0].iterdir()) == []  # neither the file nor a temp file is left


def test_offline_or_unreachable_is_one_line_naming_the_url_and_where_to_put_the_file(
        caches, monkeypatch, tmp_path, capsys):
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((5, 16, 16, 3), np.uint8))
    argv = ["eval", "--ref-batch", str(tmp_path / "images.npz"),
            "--sample-batch", str(tmp_path / "images.npz"), "--device", "cpu"]
    destination = caches[0] / "weights-inception-2015-12-05-6726825d.pth"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert cli_error(capsys, argv) == (
        "regdit eval: error: not downloading the Inception weights: HF_HUB_OFFLINE=1 is set; "
        "download https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        "weights-inception-2015-12-05-6726825d.pth on a machine with network and put it at "
        f"{destination} (or pass --inception-weights PATH)")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    unreachable = f"http://127.0.0.1:{closed_port()}/weights-inception-2015-12-05-6726825d.pth"
    monkeypatch.setattr(downloads, "INCEPTION_URL", unreachable)
    message = cli_error(capsys, argv)
    assert message == (f"regdit eval: error: cannot download the Inception weights from "
                       f"{unreachable} ([Errno 111] Connection refused): download {unreachable} "
                       f"on a machine with network and put it at {destination} "
                       "(or pass --inception-weights PATH)")
    assert not caches[0].exists() or list(caches[0].iterdir()) == []


def test_a_stalled_download_times_out_as_one_line_and_leaves_no_file(server, caches, weights,
                                                                     monkeypatch):
    url, folder, _ = server
    name = sha256_named(folder, weights, stem="stall-weights")
    monkeypatch.setattr(downloads, "INCEPTION_URL", f"{url}/{name}")
    monkeypatch.setattr(downloads, "READ_TIMEOUT", 0.5)
    with pytest.raises(RegditError) as error:
        inception_weights_path()
    assert str(error.value) == (f"cannot download the Inception weights from {url}/{name} "
                                f"(timed out): download {url}/{name} on a machine with network and "
                                f"put it at {caches[0] / name} (or pass --inception-weights PATH)")
    assert list(caches[0].iterdir()) == []


def reference(resolution=64, count=5, **changes):
    """The arrays of an ADM reference batch (statistics in float16 to keep it small: only shapes are
    checked)."""
    shape = (count, resolution, resolution, 3)
    arrays = {"arr_0": np.random.default_rng(0).integers(0, 256, shape, np.uint8),
              "arr_1": np.arange(count),
              "mu": np.zeros(2048, np.float16), "sigma": np.zeros((2048, 2048), np.float16),
              "mu_s": np.zeros(2023, np.float16), "sigma_s": np.zeros((2023, 2023), np.float16),
              **changes}
    return {key: value for key, value in arrays.items() if value is not None}


def test_a_reference_batch_by_name_is_downloaded_checked_and_reused(server, caches, monkeypatch,
                                                                    tmp_path, capsys):
    url, folder, stop = server
    (folder / "64").mkdir()
    np.savez(folder / "64" / "VIRTUAL_imagenet64_labeled.npz", **reference())
    monkeypatch.setattr(downloads, "REFERENCE_BATCHES_URL", url)
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((5, 32, 32, 3), np.uint8))
    # through the command: downloaded, then compared with the samples before any Inception forward
    cached = caches[1] / "VIRTUAL_imagenet64_labeled.npz"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["eval", "--ref-batch", "imagenet64",
                  "--sample-batch", str(tmp_path / "samples.npz"), "--device", "cpu"])
    assert exit_info.value.code.startswith(f"regdit eval: error: the reference {cached} is 64x64 "
                                           "px but the samples")
    assert capsys.readouterr().err.startswith(f"downloading ADM's reference batch imagenet64 from "
                                              f"{url}/64/{cached.name} to {cached}\n")
    assert cached.read_bytes() == (folder / "64" / "VIRTUAL_imagenet64_labeled.npz").read_bytes()
    stop()
    assert reference_batch_path("imagenet64") == cached  # from the cache, without the network


@pytest.mark.parametrize("arrays, problem", [
    (reference(resolution=32),
     r"has arr_0 of shape \(5, 32, 32, 3\), not \(N, 64, 64, 3\)"),
    (reference(arr_0=np.zeros((5, 64, 64, 3), np.float32)),
     "has arr_0 of dtype float32, not uint8"),
    (reference(sigma_s=np.zeros((2023, 7))),
     r"has sigma_s of shape \(2023, 7\), not \(2023, 2023\)"),
    (reference(mu=None), "has no mu"),
    ("not a zip", "is not a readable .npz"),
    (reference(sigma=np.full((2048, 2048), np.nan, np.float16)),
     "has non-finite values in sigma"),
    (reference(mu_s=np.zeros(2023, np.int64)), "has mu_s of dtype int64, not floats"),
    (reference(count=2), r"has 2 images, not 4 to 20000 \(ADM's reference batches hold 10000\)"),
    ("crc", r"is damaged \(Bad CRC-32 for file 'arr_0.npy'\)"),
    ("short arr_0", r"is damaged \(arr_0 holds 61437 bytes of images, not 61440\)"),
], ids=["resolution", "dtype", "statistics-shape", "no-statistics", "not-npz", "nan-statistics",
        "integer-statistics", "count", "crc", "short-images"])
def test_a_wrong_reference_batch_is_refused_and_removed(server, caches, monkeypatch, arrays,
                                                        problem):
    url, folder, _ = server
    (folder / "64").mkdir()
    served = folder / "64" / "VIRTUAL_imagenet64_labeled.npz"
    if arrays == "crc":  # one image byte flipped after the zip recorded its CRC-32
        np.savez(served, **reference())
        data = bytearray(served.read_bytes())
        data[200] ^= 1
        served.write_bytes(bytes(data))
    elif arrays == "short arr_0":  # arr_0 ends 3 bytes before its header says
        arr_0 = reference()["arr_0"].reshape(-1)
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                      "shape": (5, 64, 64, 3)})
        with zipfile.ZipFile(served, "w") as archive:
            archive.writestr("arr_0.npy", header.getvalue() + arr_0.tobytes()[:-3])
            for key, value in reference(arr_0=None).items():
                with archive.open(f"{key}.npy", "w") as member:
                    np.lib.format.write_array(member, value)
    elif isinstance(arrays, str):
        served.write_text(arrays)
    else:
        np.savez(served, **arrays)
    monkeypatch.setattr(downloads, "REFERENCE_BATCHES_URL", url)
    source = re.escape(f"{url}/64/{served.name}")
    destination = re.escape(str(caches[1] / served.name))
    with pytest.raises(RegditError, match=rf"^the download of ADM's reference batch imagenet64 "
                                          rf"from {source} {problem}.*, so it was removed: run "
                                          rf"again, or download {source} on a machine with "
                                          rf"network and put it at {destination} \(or pass "
                                          rf"--ref-batch PATH\)$"):
        reference_batch_path("imagenet64")
    assert list(caches[1].iterdir()) == []


def test_train_evaluation_takes_a_reference_batch_by_name_offline_as_one_line(caches, monkeypatch,
                                                                              tmp_path):
    from accelerate import PartialState

    from regdit.commands.monitor import TrainingEvaluation
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    weights = save_random_inception_weights(tmp_path / "inception.pth")
    config = SimpleNamespace(ref_batch="imagenet256", eval_every=1, inception_weights=str(weights))
    with pytest.raises(RegditError) as error:
        TrainingEvaluation(config, None, PartialState(), None)
    assert str(error.value) == (
        "not downloading ADM's reference batch imagenet256: HF_HUB_OFFLINE=1 is set; download "
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
        "VIRTUAL_imagenet256_labeled.npz on a machine with network and put it at "
        f"{caches[1] / 'VIRTUAL_imagenet256_labeled.npz'} (or pass --ref-batch PATH)")


def refused(url, destination, problem, alternative="--inception-weights PATH"):
    """The one line of a download refused for `problem` (a regular expression)."""
    source, destination = re.escape(url), re.escape(str(destination))
    return (rf"the download of .* from {source} {problem}, so it was removed: run again, or "
            rf"download {source} on a machine with network and put it at {destination} \(or pass "
            rf"{re.escape(alternative)}\)")


@pytest.mark.parametrize("stem, bounds, problem", [
    ("trickle-weights", dict(DEADLINE_SLACK=0.3, MIN_SPEED=1 << 40),
     r"took longer than 0 s \(at \d+ bytes\)"),
    ("endless-weights", dict(INCEPTION_MAX_BYTES=3 * CHUNK),
     rf"went on past {3 * CHUNK} bytes, more than expected"),
    ("weights", dict(INCEPTION_MAX_BYTES=1000),
     r"announces \d+ bytes, more than the 1000 expected at most"),
], ids=["trickles", "never-ends", "too-large"])
def test_a_download_is_bounded_in_time_and_size(server, caches, weights, monkeypatch, stem, bounds,
                                                problem):
    """A server that trickles one byte at a time (never stalling), one that never ends, one that
    announces more than expected: each ends in one line, and nothing is left in the cache."""
    url, folder, _ = server
    # 2000 bytes trickle for 20 s: a download without a deadline fails on its success, not a hang
    name = sha256_named(folder, weights[:2000] if stem.startswith("trickle") else weights, stem)
    monkeypatch.setattr(downloads, "INCEPTION_URL", f"{url}/{name}")
    for constant, value in bounds.items():
        monkeypatch.setattr(downloads, constant, value)
    started = time.monotonic()
    with pytest.raises(RegditError) as error:
        inception_weights_path()
    assert re.fullmatch(refused(f"{url}/{name}", caches[0] / name, problem), str(error.value))
    assert time.monotonic() - started < 10
    assert list(caches[0].iterdir()) == []


@pytest.mark.parametrize("stem, reason", [
    ("drop-weights", r"the connection closed before the end of the file"),
    ("loop-weights", r"HTTP 302: the server redirects in a loop or more than 10 times"),
], ids=["drops", "redirect-loop"])
def test_a_dropped_or_looping_download_is_one_readable_line(server, caches, monkeypatch, stem,
                                                            reason):
    url, _, _ = server
    source = f"{url}/{stem}-0123abcd.pth"
    monkeypatch.setattr(downloads, "INCEPTION_URL", source)
    with pytest.raises(RegditError) as error:
        inception_weights_path()
    assert "\n" not in str(error.value)
    assert re.fullmatch(rf"cannot download the Inception weights from {re.escape(source)} "
                        rf"\({reason}\): download .* \(or pass --inception-weights PATH\)",
                        str(error.value))
    assert list(caches[0].iterdir()) == []


def test_concurrent_downloads_into_one_cache_download_once(server, caches, weights, monkeypatch,
                                                           capsys):
    """Two downloads of the same file at once (threads open the partial file apart, so they
    compete for its lock as processes do): one downloads, the other waits and takes its file; the
    partial file of a killed run and an earlier version's temp file are cleaned up."""
    url, folder, _ = server
    name = sha256_named(folder, weights, stem="slow-weights")
    monkeypatch.setattr(downloads, "INCEPTION_URL", f"{url}/{name}")
    caches[0].mkdir(parents=True)
    (caches[0] / f".{name}.part").write_bytes(b"left by a killed run")
    (caches[0] / f".{name}.tmp4242").write_bytes(b"left by a killed run")
    Files.requests.clear()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: inception_weights_path(), range(2)))
    assert paths == [str(caches[0] / name)] * 2 and Files.requests[f"/{name}"] == 1
    assert (caches[0] / name).read_bytes() == weights
    assert sorted(p.name for p in caches[0].iterdir()) == [name]
    err = capsys.readouterr().err
    assert err.count("waiting for another process downloading the Inception weights into "
                     f"{caches[0] / f'.{name}.part'}") == 1 and err.count("downloading the") == 2


def test_a_special_file_in_the_cache_is_one_line(caches, monkeypatch):
    name = "weights-inception-2015-12-05-6726825d.pth"
    (caches[0] / name).mkdir(parents=True)
    with pytest.raises(RegditError, match=rf"^the Inception weights {re.escape(str(caches[0]))}"
                                          rf"/{name} is not a regular file: it is a folder; "):
        inception_weights_path()
