"""Training datasets: (uint8 image, VAE posterior moments, label) triples, in regdit's layout or the official one.

regdit's layout (written by `regdit prepare latents`) is a folder of memory-mapped arrays, read without decoding:

    regdit.json        metadata, written last: its presence marks a finished dataset
    images.npy         uint8 (N, 3, R, R)
    moments.npy        float32 (N, 2C, h, w): C posterior mean channels, then C std channels
    moments_flip.npy   optional: the moments of the horizontally mirrored images
    labels.npy         int64 (N,)

The official layout (REG's dataset.py) is DATA/imagenet_{R}_vae/**.png + DATA/vae-sd/**.npy + DATA/vae-sd/dataset.json,
images and latents paired by sorted relative path.
"""
import json
import os
import re

import numpy as np
import PIL.Image
import torch

from regdit import RegditError
from regdit.vae import LATENT_SCALE

META, IMAGES, MOMENTS, MOMENTS_FLIP, LABELS = "regdit.json", "images.npy", "moments.npy", "moments_flip.npy", "labels.npy"
FORMAT = "regdit-dataset-v1"
PROGRESS = ".prepare-progress"  # folder of an unfinished `regdit prepare latents`
OFFICIAL_LATENTS = "vae-sd"


def official_images_dir(resolution):
    return f"imagenet_{resolution}_vae"  # the official name at 256, generalised to other resolutions


def list_files(root, extensions):
    """Sorted '/'-separated paths relative to root of the files with these extensions, like the official reader."""
    found = []
    for folder, _, names in os.walk(root):
        found += [os.path.relpath(os.path.join(folder, n), root).replace(os.sep, "/") for n in names
                  if os.path.splitext(n)[1].lower() in extensions]
    return sorted(found)


def image_extensions():
    PIL.Image.init()
    return set(PIL.Image.EXTENSION)


def read_json(path, fix):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise RegditError(f"{path}: cannot read ({error.__class__.__name__}: {error}); {fix}") from error


def open_dataset(data_dir, resolution=None, seed=0):
    """Open and validate a prepared dataset, detecting regdit's layout or the official one.

    Items are (uint8 image (3, R, R), float32 moments (2C, h, w), int label). Attributes: num_classes, resolution,
    latent_scale, vae (name or path used to encode; "none" for pixel space, None if unknown), moments_shape,
    has_flip, labels (numpy int64); set_epoch(epoch) reseeds the flips.
    """
    data_dir = os.fspath(data_dir)
    if os.path.isfile(os.path.join(data_dir, META)):
        return RegditDataset(data_dir, resolution, seed)
    if os.path.isdir(os.path.join(data_dir, OFFICIAL_LATENTS)):
        return OfficialDataset(data_dir, resolution)
    if os.path.isdir(os.path.join(data_dir, PROGRESS)):
        raise RegditError(f"{data_dir}: unfinished `regdit prepare latents` (no {META} yet); rerun the same command "
                          f"to finish it")
    if os.path.isfile(os.path.join(data_dir, "dataset.json")):
        raise RegditError(f"{data_dir} holds images without latents; run `regdit prepare latents --source {data_dir} "
                          f"--dest DIR` and pass DIR")
    raise RegditError(f"{data_dir}: no {META} (regdit layout) or {OFFICIAL_LATENTS}/ (official layout); run "
                      f"`regdit prepare images` then `regdit prepare latents` to create a dataset")


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, seed):
        self.seed = seed
        # Shared memory, so that DataLoader workers (persistent ones too) see set_epoch() made in the main process.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch):
        self._epoch.fill_(epoch)

    def _flip(self, index):
        # A function of (seed, epoch, index) alone: resuming gives the same flips for any number of workers.
        return np.random.default_rng([self.seed, int(self._epoch), index]).random() < 0.5

    def __len__(self):
        return len(self.labels)


class RegditDataset(_Dataset):
    """regdit's memory-mapped layout (module docstring); mirrored moments, when present, give random flips."""

    def __init__(self, data_dir, resolution=None, seed=0):
        super().__init__(seed)
        self.data_dir = data_dir
        meta_path = os.path.join(data_dir, META)
        meta = read_json(meta_path, "rerun `regdit prepare latents`")
        if meta.get("format") != FORMAT:
            raise RegditError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}; rerun "
                              f"`regdit prepare latents` with this regdit version")
        try:
            n, self.resolution, self.num_classes = meta["num_images"], meta["resolution"], meta["num_classes"]
            self.vae, self.latent_scale, self.has_flip = meta["vae"], meta["latent_scale"], meta["flip"]
            self.moments_shape = tuple(meta["moments_shape"])
        except KeyError as key:
            raise RegditError(f"{meta_path}: no {key} entry; rerun `regdit prepare latents`") from None
        if resolution is not None and resolution != self.resolution:
            raise RegditError(f"{meta_path}: dataset resolution is {self.resolution}, not {resolution}; pass "
                              f"--resolution {self.resolution} or prepare the data at {resolution}")
        channels, h, w = self.moments_shape
        expected = {IMAGES: ((n, 3, self.resolution, self.resolution), np.uint8),
                    MOMENTS: ((n, channels, h, w), np.float32), LABELS: ((n,), np.int64)}
        if self.has_flip:
            expected[MOMENTS_FLIP] = expected[MOMENTS]
        for name, (shape, dtype) in expected.items():
            array = self._load(name)
            if array.shape != shape or array.dtype != dtype:
                raise RegditError(f"{os.path.join(data_dir, name)}: {array.dtype}{list(array.shape)} does not match "
                                  f"{np.dtype(dtype)}{list(shape)} in {META}; rerun `regdit prepare latents`")
        if self.resolution % h or h != w:
            raise RegditError(f"{meta_path}: moments {h}x{w} do not divide resolution {self.resolution}; rerun "
                              f"`regdit prepare latents`")
        self.labels = np.array(self._load(LABELS))
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= self.num_classes))
        if len(bad):
            raise RegditError(f"{os.path.join(data_dir, LABELS)}: label {self.labels[bad[0]]} of image {bad[0]} is "
                              f"outside 0..{self.num_classes - 1}; fix the source labels and rerun regdit prepare")
        self._arrays = None

    def _load(self, name):
        path = os.path.join(self.data_dir, name)
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise RegditError(f"{path}: cannot read ({error}); rerun `regdit prepare latents`") from error

    def __getstate__(self):  # workers map the arrays themselves: pickling a memmap would copy the whole array
        return {**self.__dict__, "_arrays": None}

    def __getitem__(self, index):
        if self._arrays is None:
            self._arrays = {name: self._load(name) for name in (IMAGES, MOMENTS, MOMENTS_FLIP)[:2 + self.has_flip]}
        flip = self.has_flip and self._flip(index)
        image = self._arrays[IMAGES][index]
        moments = self._arrays[MOMENTS_FLIP if flip else MOMENTS][index]
        image = np.array(image[:, :, ::-1] if flip else image)  # the copy also leaves the read-only map
        return torch.from_numpy(image), torch.from_numpy(np.array(moments)), int(self.labels[index])


class OfficialDataset(_Dataset):
    """The official layout: PNG images and one moments .npy per image, paired by sorted path (no flips)."""

    def __init__(self, data_dir, resolution=None):
        super().__init__(seed=0)
        self.data_dir, self.has_flip, self.vae, self.latent_scale = data_dir, False, None, LATENT_SCALE
        self.resolution = resolution if resolution is not None else self._find_resolution(data_dir)
        self.images_dir = os.path.join(data_dir, official_images_dir(self.resolution))
        self.latents_dir = os.path.join(data_dir, OFFICIAL_LATENTS)
        if not os.path.isdir(self.images_dir):
            raise RegditError(f"{self.images_dir} not found: put the {self.resolution}px images there "
                              f"(`regdit prepare images --dest {self.images_dir}`)")
        self.image_files = list_files(self.images_dir, image_extensions() | {".npy"})
        self.latent_files = list_files(self.latents_dir, {".npy"})
        if not self.latent_files or len(self.image_files) != len(self.latent_files):
            raise RegditError(f"{self.latents_dir} has {len(self.latent_files)} .npy files but {self.images_dir} has "
                              f"{len(self.image_files)} images; rerun `regdit prepare latents --layout official`")
        labels_path = os.path.join(self.latents_dir, "dataset.json")
        fix = "rerun `regdit prepare latents --layout official`"
        labels = dict(read_json(labels_path, fix).get("labels") or [])
        missing = [f for f in self.latent_files if f not in labels]
        if missing:
            raise RegditError(f"{labels_path}: no label for {missing[0]} ({len(missing)} missing); {fix}")
        self.labels = np.array([labels[f] for f in self.latent_files])
        if self.labels.dtype.kind != "i" or self.labels.min() < 0:
            raise RegditError(f"{labels_path}: labels must be integers >= 0; {fix}")
        self.num_classes = int(self.labels.max()) + 1
        for index in {0, len(self) - 1}:
            self._load_image(index), self._load_moments(index)
        self.moments_shape = self._load_moments(0).shape

    @staticmethod
    def _find_resolution(data_dir):
        found = sorted(int(m.group(1)) for n in os.listdir(data_dir)
                       if (m := re.fullmatch(official_images_dir(r"(\d+)"), n)))
        if not found:
            raise RegditError(f"{data_dir}: no {official_images_dir('R')} image folder beside {OFFICIAL_LATENTS}/; "
                              f"put the images there (`regdit prepare images --dest "
                              f"{os.path.join(data_dir, official_images_dir(256))}`)")
        if len(found) > 1:
            raise RegditError(f"{data_dir}: image folders for resolutions {found}; pass --resolution with one of them")
        return found[0]

    def _load_image(self, index):
        path = os.path.join(self.images_dir, self.image_files[index])
        if path.endswith(".npy"):
            image = np.load(path).reshape(-1, self.resolution, self.resolution)
        else:
            with PIL.Image.open(path) as f:
                image = np.array(f)
            image = image.reshape(*image.shape[:2], -1).transpose(2, 0, 1)
        if image.shape != (3, self.resolution, self.resolution) or image.dtype != np.uint8:
            raise RegditError(f"{path}: {image.dtype} image of shape {list(image.shape)} (CHW), expected uint8 "
                              f"[3, {self.resolution}, {self.resolution}]; reconvert it with `regdit prepare images`")
        return image

    def _load_moments(self, index):
        path = os.path.join(self.latents_dir, self.latent_files[index])
        moments = np.load(path)
        moments = moments[0] if moments.ndim == 4 and moments.shape[0] == 1 else moments
        if (moments.ndim != 3 or moments.shape[0] % 2 or moments.dtype != np.float32
                or moments.shape[1] * 8 != self.resolution or moments.shape[1] != moments.shape[2]):
            raise RegditError(f"{path}: {moments.dtype} moments of shape {list(moments.shape)}, expected float32 "
                              f"[2C, {self.resolution // 8}, {self.resolution // 8}] ([1, ...] allowed) for "
                              f"{self.resolution}px images; re-encode with `regdit prepare latents --layout official`")
        return moments

    def __getitem__(self, index):
        image, moments = self._load_image(index), self._load_moments(index)
        return torch.from_numpy(image.copy()), torch.from_numpy(moments), int(self.labels[index])
