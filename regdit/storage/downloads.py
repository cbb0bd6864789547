"""Files `regdit eval` and `regdit train --eval-every` download on first use: the Inception weights
and ADM's reference batches, each through `cached_download`, the one bounded, locked and checked
fetch that any further file (other weights) uses too.

The Inception weights go where torch-fidelity itself caches them
(`torch.hub.get_dir()/checkpoints/`), so either tool reuses the other's download; a reference batch
named by its ADM name (`imagenet256`) goes to the regdit cache ($REGDIT_CACHE, else
$XDG_CACHE_HOME/regdit or ~/.cache/regdit). A file is streamed to a partial file beside its
destination with a progress bar, checked (the SHA-256 prefix in its name, as torch.hub checks; a
reference batch by all its arrays, ADM publishing no hashes) and only then renamed into place; later
uses read it without the network. HF_HUB_OFFLINE=1, the switch of regdit's other downloads, turns
these off too.
"""
import contextlib
import fcntl
import hashlib
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
import zipfile
from http.client import HTTPException, IncompleteRead
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import constants
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from tqdm import tqdm

from regdit import RegditError
from regdit.files import TEMP_SUFFIX, check_regular_file, npz_headers, writing_into

INCEPTION_URL = URL_INCEPTION_V3
INCEPTION_MAX_BYTES = 128 << 20  # the file is 91 MiB
REFERENCE_BATCHES_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet"
# ADM's ImageNet reference batches (guided-diffusion/evaluations/README.md): name -> resolution,
# file
REFERENCE_BATCHES = {
    "imagenet64": (64, "VIRTUAL_imagenet64_labeled.npz"),
    "imagenet128": (128, "VIRTUAL_imagenet128_labeled.npz"),
    "imagenet256": (256, "VIRTUAL_imagenet256_labeled.npz"),
    "imagenet512": (512, "VIRTUAL_imagenet512.npz"),
}
# ADM's reference batches hold 10,000 images; twice that bounds the count and the download size
REFERENCE_MAX_IMAGES = 20000
REFERENCE_MIN_IMAGES = 4  # the metrics' 3rd nearest neighbours need 4 (evaluate.MIN_IMAGES)
STATISTICS = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}
CACHE_ENV = "REGDIT_CACHE"
# seconds without a byte before a download is given up: urllib waits forever otherwise
READ_TIMEOUT = 60
# the overall deadline: DEADLINE_SLACK seconds plus the announced (else the largest accepted) size
# at MIN_SPEED bytes/s, so that a server that trickles a byte at a time cannot hold a run forever
DEADLINE_SLACK = 600
MIN_SPEED = 256 << 10
PART_SUFFIX = ".part"  # the partial file of a download, locked while it is written
CHUNK = 1 << 20


def cache_dir():
    """The regdit cache folder: $REGDIT_CACHE, else $XDG_CACHE_HOME/regdit, else ~/.cache/regdit."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join(xdg, "regdit")))


def inception_weights():
    """torch-fidelity's Inception weights in the torch hub cache, downloaded there on first use."""
    name = INCEPTION_URL.rsplit("/", 1)[1]
    destination = Path(torch.hub.get_dir()) / "checkpoints" / name
    return cached_download(INCEPTION_URL, destination, "the Inception weights",
                           lambda path: check_sha256(path, name),
                           "or pass --inception-weights PATH", INCEPTION_MAX_BYTES)


def reference_batch(name):
    """ADM's reference batch `name` (a key of REFERENCE_BATCHES) in the regdit cache, downloaded
    there on first use."""
    resolution, file = REFERENCE_BATCHES[name]
    url = f"{REFERENCE_BATCHES_URL}/{resolution}/{file}"
    statistics = sum(int(np.prod(shape)) for shape in STATISTICS.values()) * 8  # float64
    max_bytes = REFERENCE_MAX_IMAGES * (resolution * resolution * 3 + 8) + statistics + (1 << 20)
    return cached_download(url, cache_dir() / "ref_batches" / file, f"ADM's reference batch {name}",
                           lambda path: check_reference_batch(path, resolution),
                           "or pass --ref-batch PATH", max_bytes)


def cached_download(url, destination, what, check, alternative, max_bytes):
    """`destination` if it exists, else `url` downloaded to it; `what` names the file in messages,
    `alternative` is the user's other way ("or pass --inception-weights PATH").

    Bounded: READ_TIMEOUT seconds without a byte, an overall deadline (see DEADLINE_SLACK), at most
    `max_bytes` (a larger Content-Length is refused before the body) and exactly the Content-Length
    announced. Locked: the partial file `.NAME.part` beside `destination` is held (flock) while it
    is written, so a second process downloading into the same cache waits, then takes the first's
    file; a partial file that a killed run left is overwritten. Checked: `check(partial path)`
    raises RegditError naming the problem before the file is renamed into place; a file that fails
    any of this is deleted. Offline or on a network failure, one line names the URL, the
    destination and `alternative`."""
    check_regular_file(destination, what)
    if destination.is_file():
        return destination
    by_hand = (f"download {url} on a machine with network and put it at {destination} "
               f"({alternative})")
    if constants.HF_HUB_OFFLINE:
        raise RegditError(f"not downloading {what}: HF_HUB_OFFLINE=1 is set; {by_hand}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    wait = DEADLINE_SLACK + max_bytes / MIN_SPEED + READ_TIMEOUT  # the longest another one takes
    with _locked_partial_file(destination, what, wait) as part:
        if destination.is_file():  # another process downloaded it while this one waited
            return destination
        try:
            with writing_into(destination):  # a full disk names the file, not its partial file
                _download(url, part, destination, what, max_bytes)
                check(part.name)
                os.replace(part.name, destination)
        except RegditError as error:
            raise RegditError(f"the download of {what} from {url} {error}, so it was removed: run "
                              f"again, or {by_hand}") from None
        except (urllib.error.URLError, HTTPException, TimeoutError, ConnectionError,
                ssl.SSLError) as error:
            raise RegditError(f"cannot download {what} from {url} ({_reason(error)}): "
                              f"{by_hand}") from None
    return destination


@contextlib.contextmanager
def _locked_partial_file(destination, what, wait):
    """The partial file of `destination`, opened for writing and locked (flock, released by the OS
    when a process dies), emptied: a stale one from a killed run is overwritten, and the temp
    files of earlier regdit versions' killed downloads are removed. Waits at most `wait` seconds
    for another process's lock. The partial file is gone afterwards: renamed into place, or
    deleted."""
    part = destination.with_name(f".{destination.name}{PART_SUFFIX}")
    deadline, said = time.monotonic() + wait, False
    while True:
        file = open(part, "ab+")  # closed below, or by the caller: it carries the lock
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # the lock holds only if the file is still the one at `part` (not one that the previous
            # holder renamed into place or deleted after this process opened it)
            if os.path.exists(part) and os.path.samestat(os.fstat(file.fileno()), os.stat(part)):
                break
        except BlockingIOError:
            if time.monotonic() > deadline:
                file.close()
                raise RegditError(f"another process has been downloading {what} into {part} for "
                                  f"over {wait:.0f} s; wait for it to finish, or end it") from None
            if not said:
                print(f"waiting for another process downloading {what} into {part}",
                      file=sys.stderr)
                said = True
            time.sleep(0.2)
        file.close()
    try:
        for stale in part.parent.glob(f".{destination.name}{TEMP_SUFFIX}*"):
            stale.unlink(missing_ok=True)
        file.truncate(0)
        file.seek(0)
        yield file
    finally:
        if os.path.exists(part) and os.path.samestat(os.fstat(file.fileno()), os.stat(part)):
            part.unlink()
        file.close()


def _download(url, file, destination, what, max_bytes):
    """Stream `url` into the open `file` (the partial file of `destination`) with a progress bar,
    within the bounds of cached_download; the bytes are synced to disk. RegditError for a size or a
    deadline overstepped."""
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=READ_TIMEOUT) as response:
        print(f"downloading {what} from {url} to {destination}", file=sys.stderr)
        size = int(response.headers.get("Content-Length") or 0) or None
        if size is not None and size > max_bytes:
            raise RegditError(f"announces {size} bytes, more than the {max_bytes} expected at most")
        deadline = DEADLINE_SLACK + (size or max_bytes) / MIN_SPEED
        with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=destination.name) as bar:
            # read1: one receive at a time, so that the deadline is checked while a server trickles
            while chunk := response.read1(CHUNK):
                if file.tell() + len(chunk) > max_bytes:
                    raise RegditError(f"went on past {max_bytes} bytes, more than expected")
                if time.monotonic() - started > deadline:
                    raise RegditError(f"took longer than {deadline:.0f} s (at {file.tell()} "
                                      f"bytes)")
                file.write(chunk)
                bar.update(len(chunk))
    file.flush()
    os.fsync(file.fileno())
    if size is not None and file.tell() != size:
        raise RegditError(f"ended after {file.tell()} of {size} bytes")


def _reason(error):
    """A network error in one line. Not str(error): an OSError that names a file shows the file
    instead of what went wrong, and urllib's redirect-loop error spans three lines."""
    if isinstance(error, urllib.error.HTTPError) and 300 <= error.code < 400:
        return (f"HTTP {error.code}: the server redirects in a loop or more than "
                f"{urllib.request.HTTPRedirectHandler.max_redirections} times")
    if isinstance(error, urllib.error.URLError):
        return " ".join(str(error.reason).split())
    if isinstance(error, IncompleteRead):  # its repr names a byte count of the current chunk only
        return "the connection closed before the end of the file"
    if isinstance(error, OSError):
        return error.strerror or str(error.args[0] if error.args else type(error).__name__)
    return " ".join(str(error).split()) or type(error).__name__


def check_sha256(path, name):
    """Refuse the file at `path` unless its SHA-256 starts with the hex prefix in `name`
    (torch.hub's convention: NAME-HASHPREFIX.EXT, checked by its check_hash)."""
    prefix = torch.hub.HASH_REGEX.search(name).group(1)
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(CHUNK):
            digest.update(block)
    if not digest.hexdigest().startswith(prefix):
        raise RegditError(f"has SHA-256 {digest.hexdigest()[:len(prefix)]}..., not {prefix}... as "
                          "its name says")


def check_reference_batch(path, resolution):
    """Refuse the .npz at `path` unless it is a whole ADM reference batch of `resolution` px: arr_0
    uint8 (N, R, R, 3) with REFERENCE_MIN_IMAGES <= N <= REFERENCE_MAX_IMAGES and all its bytes,
    float statistics mu (2048,), sigma (2048, 2048), mu_s (2023,), sigma_s (2023, 2023), all
    finite, and every member read to its end, so that the zip's CRC-32s are checked. The headers
    are checked before any array is read."""
    try:
        found = npz_headers(path)
    except (zipfile.BadZipFile, ValueError, OSError) as error:
        raise RegditError(f"is not a readable .npz ({error})") from None
    for key, shape in {"arr_0": (None, resolution, resolution, 3), **STATISTICS}.items():
        if key not in found:
            raise RegditError(f"has no {key}")
        dims, dtype = found[key]
        if len(dims) != len(shape) or any(e not in (None, s) for s, e in zip(dims, shape)):
            wanted = ", ".join("N" if e is None else str(e) for e in shape)
            raise RegditError(f"has {key} of shape {dims}, not ({wanted})")
        if dtype.kind != ("u" if key == "arr_0" else "f") or key == "arr_0" and dtype != np.uint8:
            raise RegditError(f"has {key} of dtype {dtype}, not "
                              + ("uint8" if key == "arr_0" else "floats"))
    count = found["arr_0"][0][0]
    if not REFERENCE_MIN_IMAGES <= count <= REFERENCE_MAX_IMAGES:
        raise RegditError(f"has {count} images, not {REFERENCE_MIN_IMAGES} to "
                          f"{REFERENCE_MAX_IMAGES} (ADM's reference batches hold 10000)")
    try:
        _read_whole(path, count * resolution * resolution * 3)
        with np.load(path) as npz:
            not_finite = [key for key in STATISTICS if not np.isfinite(npz[key]).all()]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        raise RegditError(f"is damaged ({' '.join(str(error).split())})") from None
    if not_finite:
        raise RegditError(f"has non-finite values in {', '.join(not_finite)}")


def _read_whole(path, image_bytes):
    """Read every member of the .npz `path` to its end (zipfile checks each CRC-32 there), in
    chunks; ValueError unless arr_0 holds exactly `image_bytes` bytes after its header."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as member:
                if info.filename == "arr_0.npy":
                    version = np.lib.format.read_magic(member)
                    (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)(member)
                    if info.file_size - member.tell() != image_bytes:
                        raise ValueError(f"arr_0 holds {info.file_size - member.tell()} bytes of "
                                         f"images, not {image_bytes}")
                while member.read(CHUNK):
                    pass
