"""Files `regdit eval` and `regdit train --eval-every` download on first use: the Inception weights
and ADM's reference batches.

The Inception weights go where torch-fidelity itself caches them
(`torch.hub.get_dir()/checkpoints/`), so either tool reuses the other's download; a reference batch
named by its ADM name (`imagenet256`) goes to the regdit cache ($REGDIT_CACHE, else
$XDG_CACHE_HOME/regdit or ~/.cache/regdit). A file is streamed to a temp file beside its destination
with a progress bar, checked (the SHA-256 prefix in its name, as torch.hub checks; a reference batch
by its arrays, ADM publishing no hashes) and only then renamed into place; later uses read it
without the network. HF_HUB_OFFLINE=1, the switch of regdit's other downloads, turns these off too.
"""
import hashlib
import os
import ssl
import sys
import urllib.error
import urllib.request
import zipfile
from http.client import HTTPException
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import constants
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from tqdm import tqdm

from regdit import RegditError
from regdit.files import atomic_write, npz_headers

INCEPTION_URL = URL_INCEPTION_V3
REFERENCE_BATCHES_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet"
# ADM's ImageNet reference batches (guided-diffusion/evaluations/README.md): name -> resolution,
# file
REFERENCE_BATCHES = {
    "imagenet64": (64, "VIRTUAL_imagenet64_labeled.npz"),
    "imagenet128": (128, "VIRTUAL_imagenet128_labeled.npz"),
    "imagenet256": (256, "VIRTUAL_imagenet256_labeled.npz"),
    "imagenet512": (512, "VIRTUAL_imagenet512.npz"),
}
CACHE_ENV = "REGDIT_CACHE"
# seconds without a byte before a download is given up: urllib waits forever otherwise
READ_TIMEOUT = 60
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
                           "or pass --inception-weights PATH")


def reference_batch(name):
    """ADM's reference batch `name` (a key of REFERENCE_BATCHES) in the regdit cache, downloaded
    there on first use."""
    resolution, file = REFERENCE_BATCHES[name]
    url = f"{REFERENCE_BATCHES_URL}/{resolution}/{file}"
    return cached_download(url, cache_dir() / "ref_batches" / file, f"ADM's reference batch {name}",
                           lambda path: check_reference_batch(path, resolution),
                           "or pass --ref-batch PATH")


def cached_download(url, destination, what, check, alternative):
    """`destination` if it exists, else `url` downloaded to it: streamed to a temp file beside it
    with a progress bar, `check(temp path)` (raises RegditError naming the problem), then renamed
    into place. Offline or on a network failure, one line names the URL, the destination and
    `alternative`."""
    if destination.is_file():
        return destination
    by_hand = (f"download {url} on a machine with network and put it at {destination} "
               f"({alternative})")
    if constants.HF_HUB_OFFLINE:
        raise RegditError(f"not downloading {what}: HF_HUB_OFFLINE=1 is set; {by_hand}")
    try:
        with urllib.request.urlopen(url, timeout=READ_TIMEOUT) as response:
            print(f"downloading {what} from {url} to {destination}", file=sys.stderr)
            destination.parent.mkdir(parents=True, exist_ok=True)
            size = int(response.headers.get("Content-Length") or 0) or None
            with atomic_write(destination) as file:
                with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=destination.name) as bar:
                    while chunk := response.read(CHUNK):
                        file.write(chunk)
                        bar.update(len(chunk))
                file.flush()
                try:
                    if size is not None and file.tell() != size:
                        raise RegditError(f"ended after {file.tell()} of {size} bytes")
                    check(file.name)
                except RegditError as error:
                    raise RegditError(f"the download of {what} from {url} {error}, so it was "
                                      f"removed: run again, or {by_hand}") from None
    except (urllib.error.URLError, HTTPException, TimeoutError, ConnectionError,
            ssl.SSLError) as error:
        raise RegditError(f"cannot download {what} from {url} ({_reason(error)}): "
                          f"{by_hand}") from None
    return destination


def _reason(error):
    """A network error in words. Not str(error): atomic_write names its file in an OSError, which
    str() then shows instead of what went wrong."""
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    if isinstance(error, OSError):
        return error.strerror or str(error.args[0] if error.args else type(error).__name__)
    return str(error) or type(error).__name__


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
    """Refuse the .npz at `path` unless it holds an ADM reference batch of `resolution` px: arr_0
    uint8 (N, R, R, 3), mu (2048,), sigma (2048, 2048), mu_s (2023,), sigma_s (2023, 2023). Only the
    array headers are read."""
    expected = {"arr_0": (None, resolution, resolution, 3), "mu": (2048,), "sigma": (2048, 2048),
                "mu_s": (2023,), "sigma_s": (2023, 2023)}
    try:
        found = npz_headers(path)
    except (zipfile.BadZipFile, ValueError, OSError) as error:
        raise RegditError(f"is not a readable .npz ({error})") from None
    for key, shape in expected.items():
        if key not in found:
            raise RegditError(f"has no {key}")
        dims = found[key][0]
        if len(dims) != len(shape) or any(e not in (None, s) for s, e in zip(dims, shape)):
            wanted = ", ".join("N" if e is None else str(e) for e in shape)
            raise RegditError(f"has {key} of shape {dims}, not ({wanted})")
    if found["arr_0"][1] != np.uint8:
        raise RegditError(f"has arr_0 of dtype {found['arr_0'][1]}, not uint8")
