"""Dataset layouts: how (uint8 image, VAE posterior moments, label) triples are stored, each layout
a reader (the training Dataset) and a writer (used by `regdit prepare latents`), registered together
in LAYOUTS.

regdit's layout is a folder of memory-mapped arrays, read without decoding:

    regdit.json        metadata, written last: its presence marks a finished dataset (with the
                       class names of the images' dataset.json, "classes", when it lists them)
    images.npy         uint8 (N, 3, R, R)
    moments.npy        float32 (N, 2C, h, w): C posterior mean channels, then C std channels
    moments_flip.npy   optional: the moments of the horizontally mirrored images
    labels.npy         int64 (N,)

The official layout (REG's dataset.py) is DATA/imagenet_{R}_vae/**.png + DATA/vae-sd/**.npy +
DATA/vae-sd/dataset.json, images and latents paired by sorted relative path.
"""
import json
import os
import re
import shutil
from typing import NamedTuple

import numpy as np
import torch

from regdit import RegditError
from regdit.files import atomic_write, check_regular_file
from regdit.storage.images import image_extensions, list_files, read_image
from regdit.storage.vae import LATENT_SCALE, LatentNorm

META, IMAGES, MOMENTS, MOMENTS_FLIP = "regdit.json", "images.npy", "moments.npy", "moments_flip.npy"
LABELS = "labels.npy"
FORMAT = "regdit-dataset-v1"
PROGRESS = ".prepare-progress"  # folder of an unfinished `regdit prepare latents`
OFFICIAL_LATENTS = "vae-sd"


def official_images_dir(resolution):
    # the official name at 256, generalised to other resolutions
    return f"imagenet_{resolution}_vae"


def official_latent_name(index):
    # the official dataset_tools.py encode naming
    return f"{index:08d}"[:5] + f"/img-mean-std-{index:08d}.npy"


def read_json(path, fix):
    check_regular_file(path)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:  # also invalid JSON or UTF-8
        raise RegditError(f"{path}: cannot read ({error.__class__.__name__}: {error}); "
                          f"{fix}") from error


# labels are class indices of int32 range: labels.npy, the model's class embedding and torch's
# label tensors hold them
LABEL_LIMIT = 2**31


def read_labels(meta, path, fix):
    """{name: label} of a dataset.json's `{"labels": [[name, label], ...], "classes": [...]}`
    (`meta`, read from `path`). Each label must be an integer (not a bool, a float or a string) from
    0, below the number of "classes" when it lists them, else below LABEL_LIMIT; anything else is
    one line naming the file, the entry and `fix`."""
    if not isinstance(meta, dict):
        raise RegditError(f'{path}: holds a JSON {type(meta).__name__}, not '
                          f'{{"labels": [[name, label], ...]}}; {fix}')
    pairs, classes = meta.get("labels"), meta.get("classes")
    if not isinstance(pairs, list):
        raise RegditError(f'{path}: "labels" is {pairs!r:.40}, not a list of [name, label] '
                          f'pairs; {fix}')
    if classes is not None and not isinstance(classes, list):
        raise RegditError(f'{path}: "classes" is {classes!r:.40}, not a list of class names; {fix}')
    allowed = (f"from 0 to {len(classes) - 1} (its {len(classes)} classes)" if classes
               else "from 0 to 2**31 - 1")
    labels = {}
    for entry in pairs:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise RegditError(f"{path}: labels entry {entry!r:.60} is not a [name, label] pair; "
                              f"{fix}")
        name, label = entry
        if (not isinstance(label, int) or isinstance(label, bool) or label < 0
                or label >= (len(classes) if classes else LABEL_LIMIT)):
            raise RegditError(f"{path}: label {label!r} of {name}: labels must be integers "
                              f"{allowed}; {fix}")
        labels[name] = label
    return labels


def read_classes(meta, path, fix):
    """The class names that the dataset file `meta` (read from `path`) lists under "classes": a
    list of strings, or None when it lists none."""
    classes = meta.get("classes")
    if classes is not None and not (isinstance(classes, list)
                                    and all(isinstance(name, str) for name in classes)):
        raise RegditError(f'{path}: "classes" is {classes!r:.40}, not a list of class names; {fix}')
    return classes


def load_array(path, fix, mmap_mode=None):
    """The array of the .npy file `path`, pickled objects refused (numpy's default: an object array
    would run code); an unreadable, foreign or object-array file is one line naming it and `fix`."""
    check_regular_file(path)
    try:
        array = np.load(path, mmap_mode=mmap_mode)
    except (OSError, ValueError, EOFError) as error:
        raise RegditError(f"{path}: cannot read ({error}); {fix}") from None
    if not isinstance(array, np.ndarray):  # an .npz archive under a .npy name
        array.close()
        raise RegditError(f"{path}: holds an .npz archive, not an array; {fix}")
    return array


def write_json(path, obj):
    with atomic_write(path, "w") as f:
        json.dump(obj, f)


def open_dataset(data_dir, resolution=None, seed=0):
    """Open and validate a prepared dataset with the reader of the first layout of LAYOUTS found in
    `data_dir`.

    Items are (uint8 image (3, R, R), float32 moments (2C, h, w), int label). Attributes:
    num_classes, resolution, latent_scale, latent_norm (the LatentNorm of the SiT's latents), vae
    (name or path used to encode; "none" for pixel space, None if unknown), moments_shape,
    has_flip, labels (numpy int64), classes (the class names, or None); set_epoch(epoch) reseeds
    the flips.
    """
    data_dir = os.fspath(data_dir)
    found = [(name, layout.reader) for name, layout in LAYOUTS.items()
             if layout.reader.detect(data_dir)]
    if len(found) > 1:  # which one to read would be a guess
        names = " and ".join(f"{name} ({reader.marker})" for name, reader in found)
        raise RegditError(f"{data_dir} holds {len(found)} dataset layouts, {names}: move one into "
                          "a folder of its own and pass the folder of the one to use")
    if found:
        return found[0][1](data_dir, resolution, seed)
    if os.path.isdir(os.path.join(data_dir, PROGRESS)):
        raise RegditError(f"{data_dir}: unfinished `regdit prepare latents` (no {META} yet); "
                          "rerun the same command to finish it")
    if os.path.isfile(os.path.join(data_dir, "dataset.json")):
        raise RegditError(f"{data_dir} holds images without latents; run `regdit prepare latents "
                          f"--source {data_dir} --dest DIR` and pass DIR")
    raise RegditError(f"{data_dir}: no {META} (regdit layout) or {OFFICIAL_LATENTS}/ (official "
                      "layout); run `regdit prepare images` then `regdit prepare latents` to "
                      "create a dataset")


# --------------------------------------------------------------------------------- readers


class _Dataset(torch.utils.data.Dataset):
    """A layout's reader: `detect(data_dir)` says whether a folder holds the layout (by its file or
    folder `marker`);
    `Reader(data_dir, resolution, seed)` validates it and has the items and attributes listed in
    open_dataset."""
    classes = None  # the class names, where the layout records them

    def __init__(self, seed):
        self.seed = seed
        # Shared memory, so that DataLoader workers (persistent ones too) see set_epoch() made in
        # the main process.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch):
        self._epoch.fill_(epoch)

    def _flip(self, index):
        # A function of (seed, epoch, index) alone: resuming gives the same flips for any number of
        # workers.
        return np.random.default_rng([self.seed, int(self._epoch), index]).random() < 0.5

    def __len__(self):
        return len(self.labels)

    @property
    def latent_norm(self):
        """The LatentNorm of the SiT's latents: `latent_scale` where a layout records no other."""
        return LatentNorm(scale=self.latent_scale)


class RegditDataset(_Dataset):
    """regdit's memory-mapped layout (module docstring); mirrored moments, when present, give random
    flips."""

    marker = META

    @staticmethod
    def detect(data_dir):
        return os.path.isfile(os.path.join(data_dir, META))

    def __init__(self, data_dir, resolution=None, seed=0):
        super().__init__(seed)
        self.data_dir = data_dir
        meta_path = os.path.join(data_dir, META)
        meta = read_json(meta_path, "rerun `regdit prepare latents`")
        found = meta.get("format") if isinstance(meta, dict) else None
        if found != FORMAT:
            raise RegditError(f"{meta_path}: format {found!r:.40} is not {FORMAT!r}; rerun "
                              "`regdit prepare latents` with this regdit version")
        try:
            n, self.resolution, self.num_classes = (meta["num_images"], meta["resolution"],
                                                    meta["num_classes"])
            self.vae, self.latent_scale, self.has_flip = (meta["vae"], meta["latent_scale"],
                                                          meta["flip"])
            self.moments_shape = meta["moments_shape"]
        except KeyError as key:
            raise RegditError(f"{meta_path}: no {key} entry; "
                              "rerun `regdit prepare latents`") from None
        self.classes = read_classes(meta, meta_path, "rerun `regdit prepare latents`")
        # datasets of earlier versions record the scale alone
        self._latent_norm = LatentNorm.from_dict(meta.get("latent_norm",
                                                          {"scale": self.latent_scale}), meta_path)
        sizes = [n, self.resolution, self.num_classes,
                 *(self.moments_shape if isinstance(self.moments_shape, list) else [None])]
        if len(sizes) != 6 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                      for v in sizes):
            raise RegditError(f"{meta_path}: num_images {n!r:.20}, resolution "
                              f"{self.resolution!r:.20}, num_classes {self.num_classes!r:.20}, "
                              f"moments_shape {self.moments_shape!r:.40} must be positive integers "
                              "(three for moments_shape); rerun `regdit prepare latents`")
        self.moments_shape = tuple(self.moments_shape)
        if resolution is not None and resolution != self.resolution:
            raise RegditError(f"{meta_path}: dataset resolution is {self.resolution}, not "
                              f"{resolution}; pass --resolution {self.resolution} or prepare the "
                              f"data at {resolution}")
        channels, h, w = self.moments_shape
        if self._latent_norm.kind == "channel" and len(self._latent_norm.mean) != channels // 2:
            raise RegditError(f"{meta_path}: latent_norm holds {len(self._latent_norm.mean)} "
                              f"channel statistics for latents of {channels // 2} channels; "
                              "rerun `regdit prepare latents`")
        expected = {IMAGES: ((n, 3, self.resolution, self.resolution), np.uint8),
                    MOMENTS: ((n, channels, h, w), np.float32), LABELS: ((n,), np.int64)}
        if self.has_flip:
            expected[MOMENTS_FLIP] = expected[MOMENTS]
        for name, (shape, dtype) in expected.items():
            array = self._load(name)
            if array.shape != shape or array.dtype != dtype:
                raise RegditError(f"{os.path.join(data_dir, name)}: "
                                  f"{array.dtype}{list(array.shape)} does not match "
                                  f"{np.dtype(dtype)}{list(shape)} in {META}; "
                                  "rerun `regdit prepare latents`")
        if self.resolution % h or h != w:
            raise RegditError(f"{meta_path}: moments {h}x{w} do not divide resolution "
                              f"{self.resolution}; rerun `regdit prepare latents`")
        self.labels = np.array(self._load(LABELS))
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= self.num_classes))
        if len(bad):
            raise RegditError(f"{os.path.join(data_dir, LABELS)}: label {self.labels[bad[0]]} of "
                              f"image {bad[0]} is outside 0..{self.num_classes - 1}; fix the "
                              "source labels and rerun regdit prepare")
        self._arrays = None

    @property
    def latent_norm(self):
        return self._latent_norm

    def _load(self, name):
        return load_array(os.path.join(self.data_dir, name), "rerun `regdit prepare latents`",
                          mmap_mode="r")

    def __getstate__(self):
        # workers map the arrays themselves: pickling a memmap would copy the whole array
        return {**self.__dict__, "_arrays": None}

    def __getitem__(self, index):
        if self._arrays is None:
            names = (IMAGES, MOMENTS, MOMENTS_FLIP)[:2 + self.has_flip]
            self._arrays = {name: self._load(name) for name in names}
        flip = self.has_flip and self._flip(index)
        image = self._arrays[IMAGES][index]
        moments = self._arrays[MOMENTS_FLIP if flip else MOMENTS][index]
        # the copy also leaves the read-only map
        image = np.array(image[:, :, ::-1] if flip else image)
        return torch.from_numpy(image), torch.from_numpy(np.array(moments)), int(self.labels[index])


class OfficialDataset(_Dataset):
    """The official layout: PNG images and one moments .npy per image, paired by sorted path (no
    flips)."""

    marker = OFFICIAL_LATENTS + "/"

    @staticmethod
    def detect(data_dir):
        return os.path.isdir(os.path.join(data_dir, OFFICIAL_LATENTS))

    def __init__(self, data_dir, resolution=None, seed=0):
        super().__init__(seed)
        self.data_dir, self.has_flip = data_dir, False
        self.vae, self.latent_scale = None, LATENT_SCALE
        self.resolution = resolution if resolution is not None else self._find_resolution(data_dir)
        self.images_dir = os.path.join(data_dir, official_images_dir(self.resolution))
        self.latents_dir = os.path.join(data_dir, OFFICIAL_LATENTS)
        if not os.path.isdir(self.images_dir):
            raise RegditError(f"{self.images_dir} not found: put the {self.resolution}px images "
                              f"there (`regdit prepare images --dest {self.images_dir}`)")
        self.image_files = list_files(self.images_dir, image_extensions() | {".npy"})
        self.latent_files = list_files(self.latents_dir, {".npy"})
        if not self.latent_files or len(self.image_files) != len(self.latent_files):
            raise RegditError(f"{self.latents_dir} has {len(self.latent_files)} .npy files but "
                              f"{self.images_dir} has {len(self.image_files)} images; rerun "
                              "`regdit prepare latents --layout official`")
        labels_path = os.path.join(self.latents_dir, "dataset.json")
        fix = "rerun `regdit prepare latents --layout official`"
        labels = read_labels(read_json(labels_path, fix), labels_path, fix)
        missing = [f for f in self.latent_files if f not in labels]
        if missing:
            raise RegditError(f"{labels_path}: no label for {missing[0]} ({len(missing)} missing); "
                              f"{fix}")
        self.labels = np.array([labels[f] for f in self.latent_files], dtype=np.int64)
        self.num_classes = int(self.labels.max()) + 1
        for index in {0, len(self) - 1}:
            self._load_image(index), self._load_moments(index)
        self.moments_shape = self._load_moments(0).shape

    @staticmethod
    def _find_resolution(data_dir):
        found = sorted(int(m.group(1)) for n in os.listdir(data_dir)
                       if (m := re.fullmatch(official_images_dir(r"(\d+)"), n)))
        if not found:
            raise RegditError(f"{data_dir}: no {official_images_dir('R')} image folder beside "
                              f"{OFFICIAL_LATENTS}/; put the images there (`regdit prepare images "
                              f"--dest {os.path.join(data_dir, official_images_dir(256))}`)")
        if len(found) > 1:
            raise RegditError(f"{data_dir}: image folders for resolutions {found}; pass "
                              "--resolution with one of them")
        return found[0]

    def _load_image(self, index):
        path = os.path.join(self.images_dir, self.image_files[index])
        if not path.endswith(".npy"):
            return read_image(path, (self.resolution, self.resolution, 3)).transpose(2, 0, 1)
        image = load_array(path, "reconvert it with `regdit prepare images`")
        if image.size % self.resolution ** 2 == 0:
            image = image.reshape(-1, self.resolution, self.resolution)
        if image.shape != (3, self.resolution, self.resolution) or image.dtype != np.uint8:
            raise RegditError(f"{path}: {image.dtype} image of shape {list(image.shape)} (CHW), "
                              f"expected uint8 [3, {self.resolution}, {self.resolution}]; "
                              "reconvert it with `regdit prepare images`")
        return image

    def _load_moments(self, index):
        path = os.path.join(self.latents_dir, self.latent_files[index])
        moments = load_array(path, "re-encode it with `regdit prepare latents --layout official`")
        moments = moments[0] if moments.ndim == 4 and moments.shape[0] == 1 else moments
        if (moments.ndim != 3 or moments.shape[0] % 2 or moments.dtype != np.float32
                or moments.shape[1] * 8 != self.resolution or moments.shape[1] != moments.shape[2]):
            raise RegditError(f"{path}: {moments.dtype} moments of shape {list(moments.shape)}, "
                              f"expected float32 [2C, {self.resolution // 8}, "
                              f"{self.resolution // 8}] ([1, ...] allowed) for {self.resolution}px "
                              "images; re-encode with `regdit prepare latents --layout official`")
        return moments

    def __getitem__(self, index):
        image, moments = self._load_image(index), self._load_moments(index)
        return torch.from_numpy(image.copy()), torch.from_numpy(moments), int(self.labels[index])


# --------------------------------------------------------------------------------- writers


class _Writer:
    """A layout's writer, as `regdit prepare latents` calls it, in this order:

    Writer(dest, flip, vae)   refuses settings the layout cannot store; sets `out` (the folder
                              that holds the .prepare-progress folder) and `finished_path`
                              (written last: marks a finished dataset)
    claim(source, names, resolution)
                              every process, after the settings check and before anything is written
    start(labels, resolution, moments_shape)
                              the main process: create what all processes then fill
    open()                    every process, after start
    write(indices, images, moments, moments_flip)
                              a batch of consecutive indices (moments_flip None without flip)
    sync()                    the written rows must reach the disk (before a shard's done-marker)
    close()
    finish(settings, labels, num_classes, latent_scale, moments_shape[, latent_norm])
                              the main process, after every shard; `latent_norm` (a
                              vae.LatentNorm: a shift, per-channel statistics) for the layouts
                              that store one (`stores_latent_norm`), which `prepare latents`
                              requires for anything but a scale
    The steps a layout does not need do nothing here.
    """
    stores_latent_norm = False

    def claim(self, source, names, resolution):
        pass

    def start(self, labels, resolution, moments_shape):
        pass

    def open(self):
        pass

    def sync(self):
        pass

    def close(self):
        pass


class RegditWriter(_Writer):
    """Fills the preallocated arrays of regdit's layout row by row. Plain writes, not a shared
    memory map: processes on other nodes of a network file system then never rewrite each other's
    pages."""

    stores_latent_norm = True

    def __init__(self, dest, flip, vae):
        self.out, self.finished_path, self.flip = dest, os.path.join(dest, META), flip
        self.arrays = (IMAGES, MOMENTS, MOMENTS_FLIP)[:2 + flip]
        self.files = {}

    def start(self, labels, resolution, moments_shape):
        shapes = {IMAGES: ((3, resolution, resolution), np.uint8),
                  MOMENTS: (moments_shape, np.float32), MOMENTS_FLIP: (moments_shape, np.float32)}
        for name in self.arrays:
            shape, dtype = shapes[name]
            _preallocate(os.path.join(self.out, name), (len(labels), *shape), dtype)
        with atomic_write(os.path.join(self.out, LABELS)) as f:
            np.save(f, np.array(labels, dtype=np.int64))

    def open(self):
        for name in self.arrays:
            array = np.load(os.path.join(self.out, name), mmap_mode="r")
            row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:]))
            self.files[name] = (open(os.path.join(self.out, name), "r+b"), array.offset, row_bytes)

    def write(self, indices, images, moments, moments_flip):
        for name, rows in ((IMAGES, images), (MOMENTS, moments), (MOMENTS_FLIP, moments_flip)):
            if name in self.files:
                f, offset, row_bytes = self.files[name]
                f.seek(offset + indices[0] * row_bytes)  # batches are runs of consecutive indices
                f.write(np.ascontiguousarray(rows.numpy()).tobytes())

    def sync(self):
        for f, _, _ in self.files.values():
            f.flush()
            os.fsync(f.fileno())

    def close(self):
        for f, _, _ in self.files.values():
            f.close()

    def moments(self):
        """The posterior moments written, a memory map (for `prepare latents --latent-norm
        channel`)."""
        return np.load(os.path.join(self.out, MOMENTS), mmap_mode="r")

    def finish(self, settings, labels, num_classes, latent_scale, moments_shape, latent_norm):
        # the class names of the images (a dataset.json may name them by numbers), for checkpoints
        # and `regdit app`
        images_meta = read_json(os.path.join(settings["source"], "dataset.json"),
                                "rerun `regdit prepare images`")
        classes = images_meta.get("classes")
        write_json(self.finished_path, {
            "format": FORMAT, "num_images": len(labels), "resolution": settings["resolution"],
            "num_classes": num_classes, "vae": settings["vae"], "latent_scale": latent_scale,
            "latent_norm": latent_norm.to_dict(),
            "moments_shape": list(moments_shape), "flip": self.flip, "settings": settings,
            "classes": [str(name) for name in classes] if classes else None})


def _preallocate(path, shape, dtype):
    if not os.path.exists(path):  # the file is sparse until the shards fill it
        np.lib.format.open_memmap(path + ".tmp", mode="w+", dtype=dtype, shape=shape)
        os.replace(path + ".tmp", path)


class OfficialWriter(_Writer):
    """One (1, 2C, h, w) float32 .npy per image, named and shaped as the official dataset_tools.py
    encode saves a batch of one, plus a copy of each image where the official reader looks for it
    (unless it is the source). Many small files are not synced: a kill loses nothing written; an OS
    crash may need the run redone."""

    def __init__(self, dest, flip, vae):
        if flip or vae == "none":
            raise RegditError("--layout official stores SD-VAE moments without mirrored copies: "
                              "drop --flip and --vae none, or use --layout regdit")
        self.dest, self.out = dest, os.path.join(dest, OFFICIAL_LATENTS)
        self.finished_path = os.path.join(self.out, "dataset.json")

    def claim(self, source, names, resolution):
        self.source, self.names = source, names
        self.images_out = os.path.join(self.dest, official_images_dir(resolution))
        if os.path.realpath(self.images_out) == os.path.realpath(source):
            self.images_out = None  # the images are already where the official reader looks
        elif os.path.isdir(self.images_out) and not os.path.isdir(os.path.join(self.out, PROGRESS)):
            raise RegditError(f"{self.images_out} already exists: pass it as --source, or delete "
                              f"it to copy {source} there")

    def write(self, indices, images, moments, moments_flip):
        for index, m in zip(indices, moments.numpy()):
            path = os.path.join(self.out, official_latent_name(index))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.save(path, m[None])
            if self.images_out is not None:
                image_path = os.path.join(self.images_out, self.names[index])
                os.makedirs(os.path.dirname(image_path), exist_ok=True)
                shutil.copyfile(os.path.join(self.source, self.names[index]), image_path)

    def finish(self, settings, labels, num_classes, latent_scale, moments_shape):
        if self.images_out is not None:
            shutil.copyfile(os.path.join(self.source, "dataset.json"),
                            os.path.join(self.images_out, "dataset.json"))
        pairs = [[official_latent_name(i), label] for i, label in enumerate(labels)]
        write_json(self.finished_path, {"labels": pairs, "settings": settings})


class Layout(NamedTuple):
    reader: type
    writer: type


# `prepare latents --layout NAME` writes with LAYOUTS[NAME].writer; open_dataset reads with the
# first reader that detects its layout. A new layout is one reader, one writer and one entry here.
LAYOUTS = {"regdit": Layout(RegditDataset, RegditWriter),
           "official": Layout(OfficialDataset, OfficialWriter)}
