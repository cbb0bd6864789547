"""`regdit eval`: Inception Score, FID, sFID, precision and recall of a sample .npz against a
reference .npz.

A PyTorch port of the ADM evaluator (guided-diffusion/evaluations/evaluator.py) without TensorFlow.
The network is torch-fidelity's port of the same 2015-12-05 Inception graph, TF1 bilinear resize
included; the metrics mirror ADM: FID on pool_3, sFID on the first 7 channels of `mixed_6/conv` (=
`Mixed_6d.branch1x1`), IS on the unbiased softmax, precision/recall with ADM's ManifoldEstimator (k
= 3, squared distances of float16 features, see ManifoldEstimator).
"""
import concurrent.futures
import contextlib
import io
import json
import os
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import torch
import torch.distributed as dist
import torch_fidelity
from accelerate import PartialState
from scipy import linalg, special
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)
from tqdm import tqdm

from regdit import RegditError
from regdit.commands import fd_dinov2
from regdit.commands.fd_dinov2 import DINOV2_URL
from regdit.commands.fd_dinov2 import WEIGHTS_ENV as DINOV2_WEIGHTS_ENV
from regdit.config import Settings, flag
from regdit.files import (
    atomic_write,
    check_output,
    check_regular_file,
    npz_arrays,
    npz_headers,
    read_head,
)
from regdit.run.preemption import cpu_group, launch_state, main_process_first, peer_left
from regdit.storage import downloads
from regdit.storage.hub import is_hub_url, parse, resolve_path
from regdit.storage.images import list_files, read_image

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_ENV = "REGDIT_INCEPTION_WEIGHTS"
# ADM's "mixed_6/conv:0": the graph's mixed_3 is Mixed_6a, so mixed_6 is 6d
SPATIAL_LAYER = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7  # ADM keeps spatial[..., :7]: 17 * 17 * 7 = 2023 features
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# ADM's nhood_sizes=(3,): k-th nearest neighbour, the point itself being neighbour 0
NEIGHBOURHOOD = 3
MIN_IMAGES = NEIGHBOURHOOD + 1
POOL_FEATURES = 2048  # FID's covariances are 2048 x 2048: fewer images make them rank-deficient


# --------------------------------------------------------------------------------------------------
# Images


class NpzImages:
    """The `arr_0` images (uint8, N x H x W x 3) of an .npz, checked, then read slice by slice from
    the archive.

    Like ADM's NpzArrayReader this never holds the whole array: 50k samples at 512 px are 39 GB.
    Slices are read in increasing order through one open member, so compressed archives are
    decompressed once, not per slice.
    """

    def __init__(self, path, num_images=None):
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except FileNotFoundError:
            raise RegditError(f"{path}: no such file; pass an .npz of images "
                              "(arr_0 = uint8 N x H x W x 3)") from None
        except (zipfile.BadZipFile, OSError) as error:
            raise RegditError(f"{path} is not a readable .npz ({error}); save images with "
                              "numpy.savez(path, arr_0=images)") from None
        if "arr_0.npy" not in self._zip.namelist():
            keys = [name.removesuffix(".npy") for name in self._zip.namelist()]
            self._zip.close()
            # Any zip opens here (a torch .pt has hundreds of members): a few keys identify it.
            listed = ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")
            raise RegditError(f"{path} has no arr_0 (keys: {listed or 'none'}); expected an "
                              "ADM-style .npz with arr_0 = uint8 N x H x W x 3 images, as "
                              "numpy.savez(path, arr_0=images) writes")
        self._file = self._zip.open("arr_0.npy")
        try:
            shape = self._read_header(num_images)
        except BaseException:
            self.close()
            raise
        self.shape = (shape[0] if num_images is None else num_images, *shape[1:])
        self._image_bytes = int(np.prod(shape[1:]))

    def _read_header(self, num_images):
        try:
            version = np.lib.format.read_magic(self._file)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(self._file)
        except ValueError as error:
            raise RegditError(f"{self.path}: arr_0 is not a readable .npy array ({error}); write "
                              "the .npz again") from None
        self._data_offset = self._file.tell()
        if dtype != np.uint8:
            raise RegditError(f"{self.path}: arr_0 has dtype {dtype}, expected uint8 pixels "
                              "0..255; convert the images with .clip(0, 255).astype(numpy.uint8)")
        if len(shape) != 4 or shape[3] != 3:
            layout = "; transpose NCHW to NHWC" if len(shape) == 4 and shape[1] == 3 else ""
            raise RegditError(f"{self.path}: arr_0 has shape {shape}, expected N x H x W x 3 RGB "
                              f"images{layout}")
        if fortran_order:
            raise RegditError(f"{self.path}: arr_0 is stored in Fortran order; re-save it as "
                              "numpy.ascontiguousarray")
        if num_images is not None and num_images > shape[0]:
            raise RegditError(f"{self.path} holds {shape[0]} images, fewer than the {num_images} "
                              "asked for; sample more or lower --num-samples")
        return shape

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("NpzImages supports contiguous slices only")
        images = np.empty((max(stop - start, 0), *self.shape[1:]), np.uint8)
        self._file.seek(self._data_offset + start * self._image_bytes)
        if self._file.readinto(images.data) != images.nbytes:
            raise RegditError(f"{self.path}: arr_0 is truncated (ends before image {stop}); write "
                              "the .npz again")
        return images

    def __array__(self, dtype=None, copy=None):
        return self[:] if dtype is None else self[:].astype(dtype)

    def close(self):
        self._file.close()
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def load_npz_images(path, num_images=None):
    """Open the `arr_0` images of an ADM-style .npz (checked: uint8, N x H x W x 3, at least
    `num_images` images).

    Returns an array-like (`len`, `.shape`, contiguous slices -> uint8 arrays, `numpy.asarray` for
    all of it) that reads from disk on demand; use it as a context manager to close the file.
    """
    return NpzImages(path, num_images)


class ImageFolder:
    """Same-sized RGB images under a folder (recursive, sorted by relative path) as an array-like
    like NpzImages."""

    def __init__(self, root, num_images=None):
        self.paths = [os.path.join(root, name) for name in list_files(root, IMAGE_SUFFIXES)]
        if not self.paths:
            raise RegditError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found; pass a "
                              "folder of images or an .npz")
        if num_images is not None and num_images > len(self.paths):
            raise RegditError(f"{root} holds {len(self.paths)} images, fewer than the {num_images} "
                              "asked for; lower --num-samples")
        self.paths = self.paths[:num_images]
        # every image must have the first's size
        self.shape = (len(self.paths), *read_image(self.paths[0]).shape)
        # PIL decodes outside the GIL, so a few threads keep the Inception network fed.
        self._pool = concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1))

    def _read(self, path):
        return read_image(path, self.shape[1:])

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        return np.stack(list(self._pool.map(self._read, self.paths[index])))

    def close(self):
        self._pool.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def open_images(source, num_images=None):
    """A folder of images or an .npz with `arr_0`, as a NpzImages/ImageFolder array-like."""
    if os.path.isdir(source):
        return ImageFolder(source, num_images)
    return NpzImages(source, num_images)


# --------------------------------------------------------------------------------------------------
# Inception


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def inception_weights_path(weights_path=None):
    """`weights_path`, else $REGDIT_INCEPTION_WEIGHTS (either local or `hf://`), else
    torch-fidelity's download cache (torch hub checkpoints), where the weights are downloaded on
    first use."""
    given = weights_path or os.environ.get(INCEPTION_WEIGHTS_ENV)
    if not given:
        return str(downloads.inception_weights())
    path = str(resolve_path(given, "Inception weights"))
    check_regular_file(path, "--inception-weights" if weights_path else INCEPTION_WEIGHTS_ENV)
    if not os.path.isfile(path):
        raise RegditError(f"Inception weights not found at {path}: pass the path of "
                          f"{INCEPTION_WEIGHTS_FILE} (from {URL_INCEPTION_V3}) as "
                          f"--inception-weights (or {INCEPTION_WEIGHTS_ENV}), or neither to "
                          "download it once")
    return path


def reference_batch_path(ref_batch):
    """The local file of --ref-batch: ADM's reference batch of that name (see
    downloads.REFERENCE_BATCHES), downloaded once, else the path itself (local or `hf://`)."""
    if ref_batch in downloads.REFERENCE_BATCHES:
        return downloads.reference_batch(ref_batch)
    path = resolve_path(ref_batch, "reference batch")
    check_regular_file(path, "--ref-batch")
    return path


def load_inception(weights_path=None, device=None):
    """torch-fidelity's TF-exact Inception-v3 with its weights read from a local file (see
    inception_weights_path).

    The file is read once, with `weights_only=True`, so nothing pickled in it runs.
    """
    path = inception_weights_path(weights_path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises pickle, zip and runtime errors alike
        raise RegditError(f"{path} is not a loadable Inception state dict "
                          f"({type(error).__name__}); download {URL_INCEPTION_V3} again") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor)
                                                   for v in state_dict.values()):
        raise RegditError(f"{path} is not a loadable Inception state dict (a "
                          f"{type(state_dict).__name__}, not a mapping of names to tensors); "
                          f"download {URL_INCEPTION_V3} again")
    # torch-fidelity takes only a file, which it unpickles without restrictions
    # (weights_only=False): give it the tensors just read, saved again in memory, rather than the
    # path, which it would read a second time unsafely.
    tensors = io.BytesIO()
    torch.save(state_dict, tensors)
    tensors.seek(0)
    del state_dict
    try:
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=tensors)
    except RuntimeError as error:
        raise RegditError(f"{path} does not hold torch-fidelity's Inception-v3 weights "
                          f"({str(error).splitlines()[0]}); download {URL_INCEPTION_V3}") from None
    return model.to(device or default_device())


def save_random_inception_weights(path, seed=0):
    """Random Inception-v3 weights in torch-fidelity's layout (for tests and the demo; nothing is
    downloaded).

    torchvision's Inception3 (no aux head, 1008 classes) has exactly torch-fidelity's parameter
    names and shapes. He-normal convolutions keep activations of order one, since batch norm holds
    identity statistics in eval mode.
    """
    import torchvision  # a dependency of torch-fidelity; only needed here

    torch.manual_seed(seed)
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                            init_weights=False)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.nn.init.normal_(model.fc.weight, std=model.fc.in_features ** -0.5)
    torch.save(model.state_dict(), path)
    return path


@contextlib.contextmanager
def tf32(enabled):
    """TF32 on or off for CUDA matmuls and cuDNN convolutions inside the block, restored after
    it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def exact_float32():
    """TF32 off, as the ADM evaluator computes in full float32."""
    return tf32(False)


FEATURES = ("pool", "spatial", "logits")


@torch.inference_mode()
def batch_activations(images_nhwc_uint8, model):
    """Inception features of one batch of uint8 N x H x W x 3 images: float32 arrays `pool` (N,
    2048) pool_3, `spatial` (N, 2023) the first 7 channels of Mixed_6d.branch1x1 flattened in H, W,
    C order (ADM's `spatial[..., :7].reshape(N, -1)` on NHWC), `logits` (N, 1008) without bias."""
    device = next(model.parameters()).device
    images = torch.as_tensor(np.asarray(images_nhwc_uint8)).to(device)
    spatial = []
    hook = model.get_submodule(SPATIAL_LAYER).register_forward_hook(
        lambda module, inputs, output: spatial.append(
            output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)))
    try:
        with exact_float32():
            pool, logits = model(images.permute(0, 3, 1, 2))
    finally:
        hook.remove()
    return {name: value.float().cpu().numpy()
            for name, value in zip(FEATURES, (pool, spatial[0], logits))}


def gather_batches(batches, state):
    """The per-batch results of all processes, {batch index: result}, on every process (`state` an
    accelerate PartialState; one process: unchanged)."""
    if state is None or state.num_processes == 1:
        return batches
    parts = [None] * state.num_processes
    with peer_left():  # also in set-up (the reference of --eval-every, `regdit eval`)
        dist.all_gather_object(parts, list(batches.items()), group=cpu_group())
    return dict(item for part in parts for item in part)


def compute_activations(images_nhwc_uint8, model, batch_size=64, desc="inception", state=None,
                        features=batch_activations):
    """Inception features (see batch_activations; or those of `features(images, model)`, a dict of
    arrays) of N x H x W x 3 uint8 images (an array, NpzImages or ImageFolder) in batches of
    `batch_size` consecutive images. With `state` (several processes), batch k is computed by
    process k % num_processes and the features are gathered on every process: the batches, and so
    the features, are those of one process, bit for bit."""
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    starts = range(0, len(images_nhwc_uint8), batch_size)
    mine = {k: features(images_nhwc_uint8[start:start + batch_size], model)
            for k, start in tqdm(list(enumerate(starts))[rank::world], desc=desc, unit="batch",
                                 disable=rank != 0)}
    batches = gather_batches(mine, state)
    return {name: np.concatenate([batches[k][name] for k in range(len(starts))])
            for name in batches[0]}


def dinov2_activations(images_nhwc_uint8, model):
    """FD_DINOv2 features of one batch, as `compute_activations` takes them."""
    return {"dinov2": fd_dinov2.dinov2_features(images_nhwc_uint8, model)}


def dinov2_reference(ref_npz, ref_images, model, weights, batch_size, state):
    """(mu, sigma) of the FD_DINOv2 features of the reference's images (cached beside ADM's
    batches: fd_dinov2.reference_statistics)."""
    return fd_dinov2.reference_statistics(
        ref_npz, ref_images, fd_dinov2.dinov2_weights_path(weights), state,
        lambda images: compute_activations(images, model, batch_size, "reference dinov2", state,
                                           dinov2_activations)["dinov2"])


def fd_dinov2_of(ref_npz, ref_images, sample_images, weights, batch_size, device, state):
    """FD_DINOv2 of the samples against the reference batch's images (fd_dinov2)."""
    model = fd_dinov2.load_dinov2(weights, device)
    reference = dinov2_reference(ref_npz, ref_images, model, weights, batch_size, state)
    sample = compute_activations(sample_images, model, batch_size, "samples dinov2", state,
                                 dinov2_activations)["dinov2"]
    return frechet_distance(*fid_statistics(sample), *reference)


# --------------------------------------------------------------------------------------------------
# Metrics


def fid_statistics(activations):
    """ADM's compute_statistics: mean and covariance (rows are samples), in float64."""
    activations = np.asarray(activations, np.float64)
    return np.mean(activations, axis=0), np.cov(activations, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """ADM's FIDStatistics.frechet_distance: |mu1 - mu2|^2 + tr(s1 + s2 - 2 sqrt(s1 s2)).

    sqrtm of a singular product can fail (non-finite): retry with eps * I added to both covariances.
    A complex root is accepted when its diagonal is real to 1e-3, as in ADM. Non-finite statistics
    give nan (which the command refuses), not a sqrtm error or a bogus "imaginary component".
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if not all(np.isfinite(array).all() for array in (mu1, sigma1, mu2, sigma2)):
        return float("nan")
    diff = mu1 - mu2
    # ADM's disp=False (removed from scipy): no warning, the finiteness check decides
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of "
                          "cov estimates", stacklevel=2)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise RegditError("Frechet distance: sqrtm of the covariance product has an imaginary "
                              f"component {np.max(np.abs(covmean.imag)):.3g}; "
                              "evaluate more samples")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs, split_size=5000):
    """ADM's compute_inception_score: exp(E KL(p(y|x) || p(y))) on contiguous splits (no shuffle),
    averaged."""
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


class ManifoldEstimator:
    """ADM's ManifoldEstimator (improved precision and recall, Kynkaanniemi et al. 2019) in torch.

    Each point's manifold radius is the squared distance to its k-th nearest neighbour (the point
    itself is neighbour 0). Distances are ADM's DistanceBlock, |u|^2 - 2 u.v + |v|^2 clamped at 0 on
    float16 features, recomputed in float32 for a block where any float16 value is not finite;
    blocks of 10000 x 10000 as in ADM.

    Not bit-exact to ADM: the float16 squares are summed in float32 and each norm is rounded to
    float16 once (u.v likewise: a float32-accumulated matmul rounded once), while TF's float16
    reduce_sum keeps float16 partial sums on GPU. Chosen by measurement: the difference to ADM's
    precision and recall is within a few thousandths (benchmarks/RESULTS.md, section 'Precision and
    recall with float16 squared norms').
    """

    def __init__(self, row_batch_size=10000, col_batch_size=10000, nhood_sizes=(NEIGHBOURHOOD,),
                 device=None):
        self.row_batch_size = row_batch_size
        self.col_batch_size = col_batch_size
        self.nhood_sizes = list(nhood_sizes)
        self.device = torch.device(device or default_device())

    @staticmethod
    def _squared_distances(u, v):
        # torch sums float16 in float32 and rounds once (see the docstring)
        norm_u = u.square().sum(1, keepdim=True)
        norm_v = v.square().sum(1)[None]
        # float32 accumulation: TF_FP16_MATMUL_USE_FP32_COMPUTE default
        uv = (u.float() @ v.float().T).to(u.dtype)
        return (norm_u - 2 * uv + norm_v).clamp_min(0)

    def pairwise_distances(self, u, v):
        """Squared euclidean distances (float32) between the rows of u and v (float32 tensors)."""
        with exact_float32():
            distances = self._squared_distances(u.half(), v.half())
            if torch.isfinite(distances).all():
                return distances.float()
            return self._squared_distances(u, v)

    def _tensor(self, array):
        return torch.as_tensor(np.ascontiguousarray(array, np.float32), device=self.device)

    def manifold_radii(self, features):
        """(N, len(nhood_sizes)) float32 radii: the k-th smallest squared distance of each row to
        all rows."""
        features = self._tensor(features)
        radii = []
        for start in range(0, len(features), self.row_batch_size):
            rows = features[start:start + self.row_batch_size]
            columns = [features[col:col + self.col_batch_size]
                       for col in range(0, len(features), self.col_batch_size)]
            distances = torch.cat([self.pairwise_distances(rows, part) for part in columns], dim=1)
            # ascending: column k is the k-th nearest neighbour, column 0 the point itself
            nearest = distances.topk(max(self.nhood_sizes) + 1, dim=1, largest=False).values
            radii.append(nearest[:, self.nhood_sizes])
        return torch.cat(radii).cpu().numpy()

    def evaluate_pr(self, features_1, radii_1, features_2, radii_2):
        """(precision, recall) per neighbourhood size, set 1 being the reference and set 2 the
        samples.

        Precision: fraction of set 2 within (<=) the radius of some point of set 1; recall: the
        converse.
        """
        features_1, radii_1 = self._tensor(features_1), self._tensor(radii_1)
        features_2, radii_2 = self._tensor(features_2), self._tensor(radii_2)
        status_1 = torch.zeros(len(features_1), radii_2.shape[1], dtype=torch.bool,
                               device=self.device)
        status_2 = torch.zeros(len(features_2), radii_1.shape[1], dtype=torch.bool,
                               device=self.device)
        for start_1 in range(0, len(features_1), self.row_batch_size):
            end_1 = start_1 + self.row_batch_size
            for start_2 in range(0, len(features_2), self.col_batch_size):
                end_2 = start_2 + self.col_batch_size
                distances = self.pairwise_distances(features_1[start_1:end_1],
                                                    features_2[start_2:end_2])[..., None]
                status_1[start_1:end_1] |= (distances <= radii_2[None, start_2:end_2]).any(1)
                status_2[start_2:end_2] |= (distances <= radii_1[start_1:end_1, None]).any(0)
        return status_2.double().mean(0).cpu().numpy(), status_1.double().mean(0).cpu().numpy()

    def precision_recall(self, ref_features, sample_features):
        """ADM's Evaluator.compute_prec_recall: (precision, recall) of the first neighbourhood
        size."""
        precision, recall = self.evaluate_pr(ref_features, self.manifold_radii(ref_features),
                                             sample_features, self.manifold_radii(sample_features))
        return float(precision[0]), float(recall[0])


# --------------------------------------------------------------------------------------------------
# Evaluation


def read_reference_statistics(path):
    """ADM's read_statistics: (mu, sigma), (mu_s, sigma_s) from the npz when it has `mu`, else
    None."""
    rebuild = "rebuild it with `regdit eval --make-ref`"
    try:
        headers = npz_headers(path)
    except (zipfile.BadZipFile, ValueError) as error:
        raise RegditError(f"{path} is not a readable .npz ({error}); {rebuild}") from None
    if "mu" not in headers:
        return None
    missing = [key for key in ("sigma", "mu_s", "sigma_s") if key not in headers]
    if missing:
        raise RegditError(f"{path} has mu but no {', '.join(missing)}; {rebuild}")
    for key, dims in (("mu", (2048,)), ("sigma", (2048, 2048)), ("mu_s", (2023,)),
                      ("sigma_s", (2023, 2023))):
        shape, dtype = headers[key]
        # checked before loading: a crafted header could claim any size
        if shape != dims or dtype.kind != "f":
            raise RegditError(f"{path}: {key} is {dtype} of shape {shape}, expected floats of "
                              f"shape {dims}; {rebuild}")
    with np.load(path) as npz:
        stats = [np.asarray(npz[key], np.float64) for key in ("mu", "sigma", "mu_s", "sigma_s")]
    for (mu, sigma), name in zip((stats[:2], stats[2:]), ("mu, sigma", "mu_s, sigma_s")):
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise RegditError(f"{path}: {name} hold non-finite values, so FID against them is not "
                              "a number; rebuild it with `regdit eval --make-ref`")
    return tuple(stats[:2]), tuple(stats[2:])


def _check_count(path, count):
    if count < MIN_IMAGES:
        raise RegditError(f"{path} holds {count} images; the metrics need at least {MIN_IMAGES} "
                          f"(covariances, {NEIGHBOURHOOD}rd nearest neighbours)")


def check_resolutions(ref_npz, ref_shape, sample_npz, sample_shape, allow_mismatch=False,
                      override=None):
    """Refuse (or, when allowed, warn about) a reference and samples of different sizes: Inception
    resizes both to 299 px, so the metrics would run, but they would score the resizing as much as
    the model. `override`: the caller's flag that allows a mismatch, named in the refusal (None: the
    caller has none)."""
    (ref_height, ref_width), (height, width) = ref_shape[1:3], sample_shape[1:3]
    if (ref_height, ref_width) == (height, width):
        return
    mismatch = (f"the reference {ref_npz} is {ref_width}x{ref_height} px but the samples "
                f"{sample_npz} are {width}x{height} px")
    if not allow_mismatch:
        raise RegditError(f"{mismatch}: the metrics would not be comparable to published ones; use "
                          "a reference batch of the samples' resolution "
                          "(`regdit eval --make-ref IMAGES --output REF.npz` builds one)"
                          + (f", or pass {override}" if override else ""))
    print(f"warning: {mismatch}; the metrics are not comparable to published ones", file=sys.stderr)


def evaluate(ref_npz, sample_npz, inception_weights=None, batch_size=64, num_samples=None,
             device=None, allow_resolution_mismatch=False, dinov2_weights=None, with_fd=False):
    """IS, FID, sFID, precision and recall of `sample_npz` (`arr_0`; the first `num_samples` if
    given) against `ref_npz` (`arr_0` plus optional `mu, sigma, mu_s, sigma_s`; or an ADM name, see
    reference_batch_path), as ADM's evaluator computes them; `with_fd`: also FD_DINOv2 against the
    reference's `arr_0` (regdit.commands.fd_dinov2, the weights `dinov2_weights`).

    Both files (local or `hf://`), their sizes and the reference statistics are checked before the
    first Inception forward."""
    state = launch_state()
    # one process downloads what is missing, the others then read the cache
    with main_process_first():
        sample_npz = resolve_path(sample_npz, "sample batch")
        check_regular_file(sample_npz, "--sample-batch")
        ref_npz = reference_batch_path(ref_npz)
    device = device or state.device
    with (load_npz_images(ref_npz) as ref_images,
          load_npz_images(sample_npz, num_samples) as sample_images):
        _check_count(sample_npz, len(sample_images))
        check_resolutions(ref_npz, ref_images.shape, sample_npz, sample_images.shape,
                          allow_resolution_mismatch, "--allow-resolution-mismatch")
        with main_process_first():
            weights = inception_weights_path(inception_weights)
            # before the Inception work: a download that cannot be is one line at once
            dinov2 = fd_dinov2.dinov2_weights_path(dinov2_weights) if with_fd else None
        model = load_inception(weights, device)
        reference = Reference.from_batch(ref_npz, ref_images, model, batch_size, state)
        sample = compute_activations(sample_images, model, batch_size, desc="samples", state=state)
        sample_resolution = list(sample_images.shape[1:3])
        fd = {} if not with_fd else {"fd_dinov2": fd_dinov2_of(
            ref_npz, ref_images, sample_images, dinov2, batch_size, device, state)}
    warn_if_few((ref_npz, len(reference.pool)), (sample_npz, len(sample["pool"])))
    return {**reference.metrics(sample, device), **fd, "settings": {
        "ref_batch": os.path.abspath(ref_npz), "sample_batch": os.path.abspath(sample_npz),
        "num_ref": len(reference.pool), "num_samples": len(sample["pool"]),
        "ref_statistics_from": reference.statistics_from, "ref_resolution": reference.resolution,
        "sample_resolution": sample_resolution, "batch_size": batch_size,
        "num_processes": state.num_processes, "inception_weights": os.path.abspath(weights),
        "device": str(device), "torch": torch.__version__,
        "torch_fidelity": torch_fidelity.__version__,
        **({"dinov2_weights": os.path.abspath(dinov2)} if with_fd else {})}}


def warn_if_few(*counts):
    """One warning line for the (name, image count) pairs below the Inception feature size."""
    few = [f"{name} ({count})" for name, count in counts if count < POOL_FEATURES]
    if few and PartialState().is_main_process:
        print(f"warning: fewer than {POOL_FEATURES} images (the Inception feature size) in "
              f"{' and '.join(few)}: FID is rank-deficient and strongly biased; these metrics are "
              "not comparable to 50k-sample numbers", file=sys.stderr)


class Reference:
    """The reference side of every metric, computed once: the pool features of `arr_0` (precision
    and recall) and the FID / sFID statistics ((mu, sigma) of the pool and spatial features).
    `metrics(sample_features)` then scores any number of sample sets against it."""

    def __init__(self, pool, statistics, statistics_from="arr_0", resolution=None):
        self.pool, self.statistics = pool, statistics
        self.statistics_from, self.resolution = statistics_from, resolution

    @classmethod
    def from_batch(cls, path, images, model, batch_size=64, state=None):
        """The reference of an ADM batch: its `mu, sigma, mu_s, sigma_s` when present (checked
        before any Inception forward), else the statistics of its `arr_0`."""
        _check_count(path, len(images))
        statistics = read_reference_statistics(path)
        features = compute_activations(images, model, batch_size, desc="reference", state=state)
        return cls(features["pool"], statistics or (fid_statistics(features["pool"]),
                                                    fid_statistics(features["spatial"])),
                   "npz" if statistics else "arr_0", list(images.shape[1:3]))

    def metrics(self, sample, device=None):
        """IS, FID, sFID, precision and recall of sample features (compute_activations), as ADM
        computes them."""
        estimator = ManifoldEstimator(device=device)
        precision, recall = estimator.precision_recall(self.pool, sample["pool"])
        # overflowing logits give nan, which run_eval refuses
        with np.errstate(over="ignore", invalid="ignore"):
            score = inception_score(special.softmax(sample["logits"], axis=1))
        return {"inception_score": score,
                "fid": frechet_distance(*fid_statistics(sample["pool"]), *self.statistics[0]),
                "sfid": frechet_distance(*fid_statistics(sample["spatial"]), *self.statistics[1]),
                "precision": precision, "recall": recall}


def make_reference(source, output, inception_weights=None, batch_size=64, num_images=None,
                   ref_images=10000, device=None):
    """Write an ADM-style reference batch: `mu, sigma` (pool_3) and `mu_s, sigma_s` (spatial) over
    every image of `source` (a folder or an .npz; the first `num_images` if given), and `arr_0` =
    `ref_images` of them, evenly spaced (ADM's reference batches likewise pair full-dataset
    statistics with 10k images for recall)."""
    # several processes share the Inception work; the main one writes
    state = launch_state()
    check_regular_file(source, "--make-ref", folder=True)
    with open_images(source, num_images) as images:
        _check_count(source, len(images))
        # one process downloads the weights if missing, the others then read them
        with main_process_first():
            model = load_inception(inception_weights, device or state.device)
        activations = compute_activations(images, model, batch_size, desc="reference", state=state)
        if not all(np.isfinite(activations[name]).all() for name in ("pool", "spatial")):
            raise RegditError(f"Inception features of {source} are not finite, so no reference is "
                              f"written; the weights {inception_weights_path(inception_weights)} "
                              "are likely broken")
        spaced = np.linspace(0, len(images) - 1, min(ref_images, len(images)))
        keep = np.unique(spaced.round().astype(int))
        arr_0 = np.stack([images[index:index + 1][0] for index in keep])
    if state.is_main_process:
        mu, sigma = fid_statistics(activations["pool"])
        mu_s, sigma_s = fid_statistics(activations["spatial"])
        with atomic_write(output) as file:
            np.savez(file, arr_0=arr_0, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    return {"reference": os.path.abspath(output), "source": os.path.abspath(source),
            "images_in_statistics": len(activations["pool"]), "images_in_arr_0": len(arr_0)}


# --------------------------------------------------------------------------------------------------
# Command line

METRIC_NAMES = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID",
                "precision": "Precision", "recall": "Recall"}
FD_DINOV2_NAME = {"fd_dinov2": "FD_DINOv2"}  # with --fd-dinov2
NON_FINITE_CAUSES = {  # the likely reason a metric is not a number
    "inception_score": "the Inception logits overflow or are not finite "
                       "(check --inception-weights)",
    "fid": "non-finite pool_3 features or a failed covariance square root "
           "(check --inception-weights, --device)",
    "sfid": "non-finite Mixed_6d features or a failed covariance square root "
            "(check --inception-weights, --device)",
    "fd_dinov2": "non-finite DINOv2 features or a failed covariance square root "
                 "(check --dinov2-weights, --device)",
}


NEEDS_BATCHES = ("regdit eval needs --ref_batch REF.npz and --sample_batch SAMPLES.npz (or "
                 "--make-ref IMAGES --output REF.npz to build a reference)")


@dataclass
class EvalConfig(Settings):
    """Settings of `regdit eval`: evaluate samples against a reference batch, or build one with
    --make-ref."""

    ref_batch: str | None = flag(None, "reference batch: arr_0 uint8 NHWC images, optionally "
                                 "mu/sigma/mu_s/sigma_s; or ADM's, by name "
                                 f"({', '.join(downloads.REFERENCE_BATCHES)}), downloaded once",
                                 aliases=("--ref_batch",), metavar="REF.npz")
    sample_batch: str | None = flag(None, "samples to evaluate: arr_0 uint8 NHWC images (as "
                                    "written by `regdit sample`)", aliases=("--sample_batch",),
                                    metavar="SAMPLES.npz")
    make_ref: str | None = flag(None, "instead of evaluating, build a reference .npz (written to "
                                "--output) from these images", metavar="IMAGES_DIR_OR_NPZ")
    ref_images: int = flag(10000, "with --make-ref: images kept in arr_0 for recall (the "
                                  "statistics use all images)", at_least=1)
    inception_weights: str | None = flag(None, f"{INCEPTION_WEIGHTS_FILE} (from "
                                         f"{URL_INCEPTION_V3}); None: ${INCEPTION_WEIGHTS_ENV}, "
                                         "else torch-fidelity's download cache, where it is "
                                         "downloaded on first use", metavar="PATH")
    batch_size: int = flag(64, "images per Inception forward", at_least=1)
    num_samples: int | None = flag(None, "evaluate exactly the first N samples (--make-ref: the "
                                   "first N images); None: all", at_least=1)
    output: str | None = flag(None, "metrics JSON; None: SAMPLES.metrics.json beside the samples "
                              "(hf:// samples: in the current folder). With --make-ref: the "
                              "reference .npz to write", metavar="PATH")
    device: str | None = flag(None, "torch device; None: cuda if available, else cpu")
    fd_dinov2: bool = flag(False, "also FD_DINOv2 (Stein et al. 2023; DINOv2 ViT-L/14 features "
                                  "at 224 px, as EDM2) against the reference's arr_0 images")
    dinov2_weights: str | None = flag(None, "with --fd-dinov2: dinov2_vitl14_pretrain.pth (from "
                                            f"{DINOV2_URL}); None: ${DINOV2_WEIGHTS_ENV}, else "
                                            "the torch hub cache, "
                                            "where it is downloaded on first use",
                                      metavar="PATH")
    allow_resolution_mismatch: bool = flag(False, "evaluate samples against a reference of another "
                                           "resolution (the metrics are then not comparable to "
                                           "published ones)")

    def check(self):
        if self.make_ref:
            if self.ref_batch or self.sample_batch:
                raise RegditError("--make-ref builds a reference and evaluates nothing: drop "
                                  "--ref_batch and --sample_batch")
            if not self.output:
                raise RegditError(f"--make-ref {self.make_ref} needs --output REF.npz (the "
                                  "reference file to write)")
        elif (self.ref_batch is None) != (self.sample_batch is None):
            raise RegditError(NEEDS_BATCHES)


def output_path(config):
    """The file the command writes: --output, else the metrics JSON beside the samples."""
    if config.output or config.make_ref:
        return config.output
    if is_hub_url(config.sample_batch):  # beside it is the Hub cache: the current folder instead
        return PurePosixPath(parse(config.sample_batch).path).stem + ".metrics.json"
    return os.path.splitext(config.sample_batch)[0] + ".metrics.json"


def check_output_file(config, path):
    """A one-line error now, not after the Inception forwards, when `path` cannot be written: its
    folder must exist and be writable (atomic_write puts a temporary file beside it), and it must be
    new or what this command wrote there before (a metrics JSON, or with --make-ref a reference
    .npz), never one of the command's inputs."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise RegditError(f"cannot write {path}: {folder} is a file, not a folder; "
                          "pass another --output")
    if not os.path.isdir(folder):
        raise RegditError(f"cannot write {path}: the folder {folder} does not exist; create it or "
                          "pass another --output")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RegditError(f"cannot write {path}: the folder {folder} is not writable; "
                          "pass another --output")
    weights = config.inception_weights or os.environ.get(INCEPTION_WEIGHTS_ENV)
    inputs = {"--ref-batch": config.ref_batch, "--sample-batch": config.sample_batch,
              "--make-ref": config.make_ref, "Inception weights": weights,
              "DINOv2 weights": ((config.dinov2_weights or os.environ.get(DINOV2_WEIGHTS_ENV))
                                 if config.fd_dinov2 else None)}
    foreign = foreign_to_reference if config.make_ref else foreign_to_metrics
    check_output(path, "--output", foreign, inputs)


REFERENCE_ARRAYS = ("arr_0", "mu", "sigma", "mu_s", "sigma_s")  # what make_reference writes


def foreign_to_metrics(path):
    """None for a metrics JSON that `regdit eval` wrote (the five metrics and "settings"), else what
    it is instead."""
    try:
        results = json.loads(read_head(path, 1 << 20))  # a metrics JSON is about 700 bytes
    except ValueError:
        results = None
    if not isinstance(results, dict) or not {*METRIC_NAMES, "settings"} <= results.keys():
        return "it is not a metrics JSON of `regdit eval` (the five metrics and their settings)"
    return None


def foreign_to_reference(path):
    """None for a reference .npz that `regdit eval --make-ref` wrote (arr_0 and the statistics),
    else what it is."""
    if not set(REFERENCE_ARRAYS) <= npz_arrays(path):
        return ("it is not a reference .npz of `regdit eval --make-ref` "
                f"({', '.join(REFERENCE_ARRAYS)})")
    return None


def check_finite(results):
    """Refuse metrics that are not numbers (nan, inf): they must not be written as if they were
    scores."""
    names = {**METRIC_NAMES, **{k: v for k, v in FD_DINOV2_NAME.items() if k in results}}
    bad = [key for key in names if not np.isfinite(results[key])]
    if bad:
        values = ", ".join(f"{names[key]} = {results[key]}" for key in bad)
        causes = "; ".join(dict.fromkeys(NON_FINITE_CAUSES.get(key, "non-finite Inception features")
                                         for key in bad))
        raise RegditError(f"{values}: not finite, so no metrics file is written; likely cause: "
                          f"{causes}")


def run_eval(config):
    """`regdit eval`: print and write the metrics of --sample-batch against --ref-batch (or build a
    reference)."""
    if not (config.make_ref or config.ref_batch):
        raise RegditError(NEEDS_BATCHES)
    output = output_path(config)
    check_output_file(config, output)
    if config.make_ref:
        summary = make_reference(config.make_ref, output, config.inception_weights,
                                 config.batch_size, config.num_samples, config.ref_images,
                                 config.device)
        PartialState().print(f"wrote {summary['reference']}: statistics of "
                             f"{summary['images_in_statistics']} images, arr_0 of "
                             f"{summary['images_in_arr_0']}")
        return summary
    results = evaluate(config.ref_batch, config.sample_batch, config.inception_weights,
                       config.batch_size, config.num_samples, config.device,
                       config.allow_resolution_mismatch, config.dinov2_weights, config.fd_dinov2)
    check_finite(results)
    # every process computed its share of the features, one writes
    if PartialState().is_main_process:
        print(f"{'metric':<16} {'value':>10}")
        for key, name in {**METRIC_NAMES, **FD_DINOV2_NAME}.items():
            if key in results:
                print(f"{name:<16} {results[key]:>10.4f}")
        with atomic_write(output) as file:
            file.write(json.dumps(results, indent=2).encode())
        print(f"wrote {output}")
    return results
