"""`regdit prepare images|latents|vae`: raw images -> square RGB PNGs + labels -> VAE posterior
moments, and a small VAE fitted to the images where no pretrained one covers them.

Each step checks every setting before it creates anything (the config's ranges, then `check_paths`),
and is resumable: finished work is recorded atomically (a file is written under a temporary name,
then renamed), so rerunning the same command after a kill, or after a full disk, continues where it
stopped (`prepare vae`, a minute of work, starts its fit over). `prepare latents` runs on every
process of `accelerate launch` / `torchrun`, each encoding its own shards.
"""
import functools
import json
import multiprocessing
import os
import shutil
import sys
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from tqdm import tqdm

from regdit import RegditError, Stopped
from regdit.config import FOLDER, Settings, changed_settings, flag
from regdit.files import atomic_write, check_regular_file, remove_temp_files, writing_into
from regdit.run.preemption import (
    StopVote,
    barrier,
    launch_state,
    stop_signals,
    worker_loader,
)
from regdit.run.runlock import LOCK_NAME, RunLock, lock_run
from regdit.storage import vae as vae_lib
from regdit.storage.data import LAYOUTS, PROGRESS, read_json, read_labels, write_json
from regdit.storage.hub import is_hub_url, parse
from regdit.storage.images import image_extensions, list_files, open_image, read_image

# --------------------------------------------------------------------------------- pixels and crops

# how PIL reports a bad file; open_image's ImageTooLarge too
UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, zlib.error,
              PIL.Image.DecompressionBombError)
# The white level of each high-bit-depth mode PIL's convert("RGB") would clip at 255; the first that
# holds every value of an image wins (see to_rgb).
WHITE_LEVELS = {"I;16": (65535,), "I": (65535,), "F": (1, 255)}


def to_rgb(image):
    """`image` upright and 8-bit RGB, as an image viewer shows it.

    The EXIF orientation is applied first (cameras store portraits as rotated landscapes plus a tag;
    the official converter ignores the tag, so the few tagged ImageNet JPEGs crop differently here).
    High-bit-depth grayscale is scaled, not clipped by convert("RGB") (which turns a 16-bit PNG
    almost white and a [0, 1] float TIFF black):
    - 16-bit integer (I;16, I;16B, I;16L, ...): value / 257, so 0..65535 spans 0..255 (a 16-bit
      copy of 8-bit data, v * 257, gives v back);
    - 32-bit integer (I): the same when every value lies in 0..65535 (16-bit data, as some readers
      load it), else the image's min..max spans 0..255;
    - 32-bit float (F): value * 255 when every value lies in [0, 1]; the value itself in [0, 255]
      (PIL's scale for 8-bit data made float); else min..max spans 0..255.
    NaN and infinite floats become black. Every other mode (palette, RGBA, LA, CMYK, 8-bit
    grayscale...) goes through convert("RGB") like the official converter.
    """
    PIL.ImageOps.exif_transpose(image, in_place=True)
    white_levels = WHITE_LEVELS.get(image.mode[:4])
    if white_levels is None:
        return image.convert("RGB")
    pixels = np.asarray(image, dtype=np.float32)  # float32 holds every 16-bit value exactly
    finite = np.isfinite(pixels)
    lo, hi = (pixels[finite].min(), pixels[finite].max()) if finite.any() else (0, 0)
    black, white = next(((0, w) for w in white_levels if lo >= 0 and hi <= w), (lo, hi))
    gray = np.where(finite, (pixels - black) * (255 / (white - black) if white > black else 0), 0)
    return PIL.Image.fromarray(np.rint(gray).astype(np.uint8)).convert("RGB")


def center_crop_dhariwal(image, resolution):
    """ADM's center_crop_arr (guided-diffusion image_datasets.py), the official
    `--transform=center-crop-dhariwal`."""
    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=PIL.Image.BOX)
    scale = resolution / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=PIL.Image.BICUBIC)
    array = np.array(image)
    top, left = (array.shape[0] - resolution) // 2, (array.shape[1] - resolution) // 2
    return array[top:top + resolution, left:left + resolution]


def center_crop(image, resolution):
    """EDM2 dataset_tool's `center-crop`: the largest centred square, LANCZOS-resized."""
    array = np.array(image)
    (h, w), side = array.shape[:2], min(array.shape[:2])
    array = array[(h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2]
    return np.array(PIL.Image.fromarray(array).resize((resolution, resolution), PIL.Image.LANCZOS))


TRANSFORMS = {"center-crop-dhariwal": center_crop_dhariwal, "center-crop": center_crop}


# --------------------------------------------------------------------------------- resumable output


# settings that are paths: the same where they lie as they lay, relative to the output folder,
# after it moved or was copied with them (config.changed_setting)
PATH_SETTINGS = ("source", "vae")


def claim_dest(out, settings, finished_path):
    """Check that `out` is new or holds a run with the same settings; True when that run has
    finished."""
    settings_path = os.path.join(out, PROGRESS, "settings.json")
    fix = f"use a new --dest or delete {out}"
    if os.path.isfile(settings_path):
        previous = read_json(settings_path, fix)
    elif os.path.isfile(finished_path):
        previous = read_json(finished_path, fix).get("settings")
    elif os.path.isdir(out) and [n for n in os.listdir(out) if not n.startswith(LOCK_NAME)]:
        raise RegditError(f"{out} is not empty and holds no regdit prepare output; {fix}")
    else:
        return False
    previous = previous if isinstance(previous, dict) else {}
    changed = sorted([k for k in settings if k not in previous and k != FOLDER]
                     + changed_settings(previous, settings, (), PATH_SETTINGS))
    if changed or not previous:
        raise RegditError(f"{out} holds a run with other settings "
                          f"({', '.join(changed) or 'unknown'}); {fix}")
    return not os.path.isfile(settings_path)


def check_paths(source, dest, accepted):
    """--source must exist and be accepted ("folder" or "folder or .zip"); --dest must be a folder
    or not exist yet, and lie outside --source (its files would become source images). Both are
    local: `prepare` reads no hf:// path."""
    if is_hub_url(source):
        raise RegditError(f"--source {source}: prepare reads local files only, not hf:// paths; "
                          f"download it first (`{parse(source).download_command()} --local-dir "
                          "DIR`) and pass --source DIR")
    if is_hub_url(dest):
        raise RegditError(f"--dest {dest}: prepare writes local folders only, not hf:// paths; "
                          "pass a local folder")
    source, dest = os.path.abspath(source), os.path.abspath(dest)
    if not os.path.exists(source):
        raise RegditError(f"--source {source}: does not exist; pass a {accepted} of images")
    check_regular_file(source, "--source", folder=True)  # is_zipfile would wait on a FIFO
    if not os.path.isdir(source) and not ("zip" in accepted and zipfile.is_zipfile(source)):
        raise RegditError(f"--source {source}: is not a {accepted}; pass a {accepted} of images")
    if os.path.commonpath([source, dest]) == source:
        raise RegditError(f"--dest {dest}: is --source or lies inside it; "
                          f"choose a --dest outside {source}")
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise RegditError(f"--dest {dest}: is a file; pass a new folder (or the folder of an "
                          "earlier run to resume)")


def start_progress(out, settings):
    os.makedirs(os.path.join(out, PROGRESS), exist_ok=True)
    write_json(os.path.join(out, PROGRESS, "settings.json"), settings)


def image_name(index):
    return f"{index:08d}"[:5] + f"/img{index:08d}.png"  # the official dataset_tools.py naming


# --------------------------------------------------------------------------------- prepare images


@functools.lru_cache(maxsize=1)
def _open_zip(path):  # one central directory read per process, not per image
    return zipfile.ZipFile(path)


def _open_source(source, name):
    if not os.path.isdir(source):
        return _open_zip(source).open(name)
    check_regular_file(os.path.join(source, name))
    return open(os.path.join(source, name), "rb")


def source_labels(source, names):
    """(labels, class names): the source's dataset.json, else the sorted top-level folder names
    (like EDM2)."""
    path, fix = f"{source}/dataset.json", "fix it or remove dataset.json to label by folder name"
    try:
        with _open_source(source, "dataset.json") as f:
            meta = json.load(f)
    except (FileNotFoundError, KeyError):  # a folder / zip without dataset.json
        meta = {}
    except ValueError as error:  # invalid JSON or UTF-8
        raise RegditError(f"{path}: cannot read ({type(error).__name__}: {error}); {fix}") from None
    if not isinstance(meta, dict) or meta.get("labels") is not None:
        labels = read_labels(meta, path, fix)
        missing = [n for n in names if n not in labels]
        if missing:
            raise RegditError(f"{path}: {len(missing)} images have no label (first: {missing[0]}); "
                              f"{fix}")
        return [labels[n] for n in names], meta.get("classes")
    folders = [n.split("/")[0] if "/" in n else "" for n in names]
    classes = sorted(set(folders))  # one folder, or none: a single class 0
    index = {c: i for i, c in enumerate(classes)}
    return [index[f] for f in folders], classes


def _convert(job):
    """Convert one image; returns (index, None) or (index, why it was skipped). Runs in the worker
    processes."""
    index, source, name, out_path, resolution, transform = job
    path = os.path.join(source, name)
    # opening a FIFO would block
    if os.path.isdir(source) and os.path.exists(path) and not os.path.isfile(path):
        return index, "not a regular file but a FIFO, device or socket"
    try:
        with _open_source(source, name) as f, open_image(f) as image:
            image = to_rgb(image)
    except UNREADABLE as error:
        return index, f"{type(error).__name__}: {error}"
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    # Uncompressed PNG like the official converter: larger files, but decoding is cheap.
    with atomic_write(out_path, sync=False) as f:
        PIL.Image.fromarray(TRANSFORMS[transform](image, resolution)).save(
            f, format="png", compress_level=0)
    return index, None




def _is_complete(job):
    """(path, whether the PNG there is a whole resolution^2 RGB image). Runs in the worker
    processes."""
    path, resolution = job
    try:
        with PIL.Image.open(path) as image:  # an empty file fails here
            complete = image.mode == "RGB" and image.size == (resolution, resolution)
            image.verify()  # every chunk's CRC, up to IEND: catches a truncated or damaged file
    except UNREADABLE:
        return path, False
    return path, complete


def finished_images(dest, resolution, pool):
    """The output names (`image_name`) an earlier run finished. Removes the PNGs that are not whole
    images (a write killed on a file system without atomic rename, or damage after it) so that they
    are converted again."""
    pngs = [(os.path.join(folder, name), resolution) for folder, _, files in os.walk(dest)
            for name in files if name.endswith(".png")]
    finished = set()
    for path, complete in pool.imap_unordered(_is_complete, pngs, chunksize=64):
        if complete:
            finished.add(os.path.relpath(path, dest).replace(os.sep, "/"))
        else:
            os.remove(path)
    return finished


@dataclass
class PrepareImagesConfig(Settings):
    source: str | None = flag(None, "folder or .zip of images; labels from its dataset.json, else "
                                    "from the sorted top-level folder names (ImageNet synset "
                                    "folders give the standard 0..999)", required=True)
    dest: str | None = flag(None, "output folder", required=True)
    resolution: int = flag(256, "side of the square output images", at_least=1)
    transform: str = flag(
        "center-crop-dhariwal", "center-crop-dhariwal: ADM's crop (the official setting); "
        "center-crop: largest centred square, LANCZOS resize", choices=list(TRANSFORMS))
    workers: int = flag(os.cpu_count(), "decoding processes (0: in-process)", at_least=0)
    strict: bool = flag(False, "fail on the first unreadable image instead of skipping it")


def prepare_images(config: PrepareImagesConfig):
    """Crop and resize every image of a folder or zip to resolution^2 RGB PNGs with a dataset.json
    of labels.

    Output names follow the source's sorted order, `{i:08d}[:5]/img{i:08d}.png`, like the official
    converter; unreadable images are skipped with a line on stderr (their index stays unused) or,
    with strict, raise. Returns {"images", "converted", "skipped" (names), "num_classes"}.
    """
    source, dest = os.path.abspath(config.source), os.path.abspath(config.dest)
    check_paths(config.source, config.dest, "folder or .zip")
    resolution, transform = config.resolution, config.transform
    if os.path.isdir(source):
        names = list_files(source)
    else:
        names = sorted(n for n in _open_zip(source).namelist()
                       if os.path.splitext(n)[1].lower() in image_extensions())
    if not names:
        raise RegditError(f"{source} contains no images "
                          f"({', '.join(sorted(image_extensions())[:6])}, ...)")
    labels, classes = source_labels(source, names)
    settings = {"source": source, "resolution": resolution, "transform": transform, FOLDER: dest}
    skipped = []
    with RunLock(dest, "prepare images"), writing_into(dest), (
            # each worker opens the zip itself: a descriptor inherited from the parent shares its
            # file offset
            multiprocessing.Pool(config.workers, initializer=_open_zip.cache_clear)
            if config.workers else _InProcess()) as pool:
        claim_dest(dest, settings, os.path.join(dest, "dataset.json"))
        remove_temp_files(dest)
        start_progress(dest, settings)
        done = finished_images(dest, resolution, pool)
        jobs = [(i, source, n, os.path.join(dest, image_name(i)), resolution, transform)
                for i, n in enumerate(names) if image_name(i) not in done]
        for index, error in tqdm(pool.imap_unordered(_convert, jobs, chunksize=16), total=len(jobs),
                                 desc="prepare images", unit="img"):
            if error and config.strict:
                raise RegditError(f"{source}/{names[index]}: unreadable image ({error}); remove or "
                                  "replace it, or drop --strict to skip it")
            if error:
                # tqdm.write keeps the progress bar below the line
                tqdm.write(f"skipping unreadable image {source}/{names[index]} ({error})",
                           file=sys.stderr)
                skipped.append(names[index])
        if len(skipped) == len(names):
            raise RegditError(f"{source}: none of the {len(names)} images could be read; "
                              "check the files")

        skipped_set = set(skipped)
        kept = [i for i, n in enumerate(names) if n not in skipped_set]
        num_classes = len(classes) if classes else max(labels) + 1
        write_json(os.path.join(dest, "dataset.json"),
                   {"labels": [[image_name(i), labels[i]] for i in kept], "classes": classes,
                    "skipped": sorted(skipped), "settings": settings})
        shutil.rmtree(os.path.join(dest, PROGRESS))
    summary = {"images": len(kept), "converted": len(jobs) - len(skipped),
               "skipped": sorted(skipped), "num_classes": num_classes}
    print(f"{dest}: {summary['images']} images of {resolution}x{resolution} in {num_classes} "
          f"classes ({summary['converted']} converted now, {len(kept) - summary['converted']} "
          f"by an earlier run), {len(skipped)} unreadable skipped")
    return summary


class _InProcess:
    """The part of multiprocessing.Pool used above, without processes (workers=0: small jobs,
    debugging)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap_unordered(function, jobs, chunksize):
        return map(function, jobs)


# --------------------------------------------------------------------------------- prepare latents


class SourceImages(torch.utils.data.Dataset):
    """The PNGs of a `prepare images` folder as uint8 (3, R, R) tensors."""

    def __init__(self, root, names, resolution):
        self.root, self.names, self.resolution = root, names, resolution

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        pixels = read_image(os.path.join(self.root, self.names[index]),
                            (self.resolution, self.resolution, 3))
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # copy: PIL's pixels are read-only


def read_image_folder(source):
    """(names, labels, num_classes, resolution) of a folder written by `prepare images` / the
    official convert."""
    meta_path = os.path.join(source, "dataset.json")
    fix = f"run `regdit prepare images --dest {source}` first"
    meta = read_json(meta_path, fix) if os.path.exists(meta_path) else {}
    if not isinstance(meta, dict) or meta.get("labels") is None:
        raise RegditError(f"{meta_path}: missing or without labels; {fix}")
    labels = read_labels(meta, meta_path, fix)
    names = list_files(source)
    missing = [n for n in names if n not in labels]
    if not names:
        raise RegditError(f"{source} holds no images; {fix}")
    if missing:
        raise RegditError(f"{meta_path}: {len(missing)} of {len(names)} images have no label "
                          f"(first: {missing[0]}); {fix}")
    labels = [labels[n] for n in names]
    num_classes = len(meta["classes"]) if meta.get("classes") else max(labels) + 1
    height, width, _ = read_image(os.path.join(source, names[0])).shape
    if height != width:
        raise RegditError(f"{source}/{names[0]}: image is {width}x{height}, not square; {fix}")
    return names, labels, num_classes, height


def shard_batches(num_images, shard_size, batch_size, shards):
    """Batches of consecutive indices that never straddle a shard, so a shard is done with its last
    batch."""
    return [list(range(start, min(start + batch_size, end)))
            for s in shards for end in [min((s + 1) * shard_size, num_images)]
            for start in range(s * shard_size, end, batch_size)]


@dataclass
class PrepareLatentsConfig(Settings):
    source: str | None = flag(None, "folder written by `regdit prepare images` (or the official "
                                    "dataset_tools.py convert)", required=True)
    dest: str | None = flag(None, "dataset folder to write", required=True)
    vae: str = flag("mse", "ema, mse, a Hub id, a save_pretrained folder (any AutoencoderKL), or "
                           "none (pixel space)")
    latent_norm: str = flag("scale", "scale: the VAE config's scaling_factor and shift_factor "
                                     "(0.18215 for the SD-VAE); channel: per-channel mean and std "
                                     "of the dataset's latents (LightningDiT)",
                            choices=vae_lib.LATENT_NORMS)
    batch_size: int = flag(64, "images per encoder call and process", at_least=1)
    flip: bool = flag(False, "also store the moments of the mirrored images (random flips in "
                             "training)")
    layout: str = flag("regdit", "regdit: memory-mapped arrays in DEST; official: "
                                 "DEST/imagenet_{R}_vae + DEST/vae-sd", choices=LAYOUTS)
    shard_size: int = flag(1024, "images per resumable unit of work", at_least=1)
    workers: int = flag(min(8, os.cpu_count()), "PNG decoding workers per process (0: in-process)",
                        at_least=0)


def prepare_latents(config: PrepareLatentsConfig):
    """Encode a `prepare images` folder to VAE posterior moments (float32 means then stds), with
    images and labels.

    The layout's writer (regdit.storage.data.LAYOUTS) decides the files: "regdit":
    DEST/{regdit.json, images.npy, moments.npy[, moments_flip.npy], labels.npy}; "official":
    DEST/imagenet_{R}_vae/ (the images) + DEST/vae-sd/{...npy, dataset.json}. Every process of an
    accelerate/torchrun launch encodes the shards of `shard_size` images with shard %
    num_processes == process index; finished shards are skipped on a rerun. On SIGTERM, SIGUSR1
    or SIGINT every process finishes its shard and the command stops (regdit.Stopped). Returns
    dest.
    """
    with stop_signals() as signals:
        return prepare_latents_with(config, signals)


def prepare_latents_with(config, signals):
    """`prepare_latents`, stopping when `signals` says so."""
    check_paths(config.source, config.dest, "folder")
    state = launch_state()
    source, dest = os.path.abspath(config.source), os.path.abspath(config.dest)
    flip, shard_size = config.flip, config.shard_size
    writer = LAYOUTS[config.layout].writer(dest, flip, config.vae)
    names, labels, num_classes, resolution = read_image_folder(source)
    settings = {"source": source, "num_images": len(names), "resolution": resolution,
                "vae": vae_lib.resolve_vae_name(config.vae), "flip": flip, "layout": config.layout,
                "shard_size": shard_size, FOLDER: writer.out,
                # recorded when not the default, so that datasets prepared before it resume
                **({"latent_norm": config.latent_norm} if config.latent_norm != "scale" else {})}
    with lock_run(dest, "prepare latents", state), writing_into(dest):
        # every process checks before the main one writes
        if claim_dest(writer.out, settings, writer.finished_path):
            if state.is_main_process:
                print(f"{dest}: already prepared with these settings")
            return dest
        writer.claim(source, names, resolution)
        if state.is_main_process:
            remove_temp_files(dest)

        vae_model = vae_lib.load_vae(config.vae, state.device)
        check_layout_norm(config, writer, vae_model)
        moments_shape = latent_moments_shape(vae_model, source, resolution)
        barrier()
        if state.is_main_process:
            start_progress(writer.out, settings)
            writer.start(labels, resolution, moments_shape)
        barrier()
        num_shards = -(-len(names) // shard_size)
        done_path = os.path.join(writer.out, PROGRESS, "shard-{:06d}.done").format
        stop = StopVote(signals)
        stop.start_safe_points()
        encode_shards(config, writer, SourceImages(source, names, resolution), vae_model, state,
                      done_path, stop)
        barrier()

        if state.is_main_process:
            missing = [s for s in range(num_shards) if not os.path.exists(done_path(s))]
            if missing:
                raise RegditError(f"{writer.out}: shards {missing[:5]} were not encoded; "
                                  "rerun the same command")
            norm = dataset_latent_norm(config.latent_norm, vae_model, writer, moments_shape)
            writer.finish(settings, labels, num_classes, norm.scale, moments_shape,
                          **({"latent_norm": norm} if writer.stores_latent_norm else {}))
            shutil.rmtree(os.path.join(writer.out, PROGRESS))
            print(f"{dest}: {len(names)} images, moments {list(moments_shape)}"
                  f"{' (+ mirrored)' if flip else ''}, {num_classes} classes, "
                  f"{config.layout} layout")
    return dest


def check_layout_norm(config, writer, vae):
    """A layout that records only a scale takes neither per-channel statistics nor a VAE whose
    latents are shifted."""
    if writer.stores_latent_norm:
        return
    if config.latent_norm != "scale" or vae_lib.vae_latent_norm(vae).shift:
        raise RegditError(f"--layout {config.layout} records a latent scale only, not "
                          + ("--latent-norm channel's statistics" if config.latent_norm != "scale"
                             else f"the shift_factor of --vae {config.vae}")
                          + ": use --layout regdit")


def dataset_latent_norm(kind, vae, writer, moments_shape):
    """The LatentNorm of a dataset: the VAE's scale, or the statistics of its latents."""
    if kind == "scale":
        return vae_lib.vae_latent_norm(vae)
    mean, std = vae_lib.channel_statistics(writer.moments(), moments_shape[0] // 2)
    if not (std > 0).all():
        raise RegditError(f"{writer.out}: latent channel(s) {np.flatnonzero(std <= 0).tolist()} "
                          "are constant over the dataset, so they cannot be normalised per "
                          "channel; pass --latent-norm scale")
    return vae_lib.LatentNorm("channel", mean=tuple(mean.tolist()), std=tuple(std.tolist()))


def latent_moments_shape(vae, source, resolution):
    """The (2C, h, w) moments of `resolution` px images, refused when the latent does not tile them:
    the SD-VAE halves the size 3 times, rounding down, so only multiples of 8 give an exact
    power-of-two factor (20 px gives a 2x2 latent, a factor of 10)."""
    blank = torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8)
    shape = tuple(vae_lib.encode_moments(vae, blank).shape[1:])
    factor = resolution // shape[1]
    if factor * shape[1] != resolution or factor & (factor - 1):
        cells = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        raise RegditError(f"{source}: {resolution} px images give a {shape[1]}x{shape[2]} latent "
                          "that does not tile them; prepare the images at a multiple of "
                          f"{cells} px")
    return shape


def encode_shards(config, writer, images, vae, state, done_path, stop):
    """Encode this process's unfinished shards of `images` (SourceImages) and hand them to the
    layout's writer; a shard's done-marker is written once its rows reached the disk. The shards go
    in rounds of one a process; `stop` (a preemption.StopVote) is asked after each round."""
    flip, shard_size, count = config.flip, config.shard_size, len(images)
    num_shards = -(-count // shard_size)
    mine = [first + state.process_index for first in range(0, num_shards, state.num_processes)]
    rounds = [shard_batches(count, shard_size, config.batch_size, [shard])
              if shard < num_shards and not os.path.exists(done_path(shard)) else []
              for shard in mine]
    batches = [batch for round_batches in rounds for batch in round_batches]
    # workers deaf to stop signals: the main process stops after a round of shards
    loader = worker_loader(images, batch_sampler=batches, num_workers=config.workers,
                           pin_memory=state.device.type == "cuda")
    writer.open()
    processes = f"{state.num_processes} process{'es' * (state.num_processes > 1)}"

    def save(indices, images, moments):
        writer.write(indices, images, *(moments.chunk(2) if flip else (moments, None)))
        # the shard is complete
        if indices[-1] + 1 == min((indices[-1] // shard_size + 1) * shard_size, count):
            writer.sync()
            write_json(done_path(indices[-1] // shard_size), {})
        progress.update(len(indices))

    # One writer thread: batch k is written while batch k+1 is encoded (chosen by measurement,
    # benchmarks/RESULTS.md, section 'Latent preparation and loading').
    with tqdm(total=sum(map(len, batches)), desc=f"encode ({processes})", unit="img",
              disable=not state.is_main_process) as progress, ThreadPoolExecutor(1) as background:
        saved = background.submit(lambda: None)
        try:
            for round_batches in rounds:
                for indices, batch in zip(round_batches, loader):
                    pixels = torch.cat([batch, batch.flip(-1)]) if flip else batch
                    moments = vae_lib.encode_moments(vae, pixels).cpu()
                    saved.result()  # also raises the writer's errors here
                    saved = background.submit(save, indices, batch, moments)
                if stop():  # every process asks as often: the same rounds
                    saved.result()
                    barrier()  # every process's shards written: the count is the rerun's
                    done = sum(os.path.exists(done_path(shard)) for shard in range(num_shards))
                    raise Stopped(f"stopped by {stop.signals.name} with {done} of {num_shards} "
                                  "shards encoded; run the same command to continue")
            saved.result()
        finally:
            writer.close()

# --------------------------------------------------------------------------------- prepare vae

@dataclass
class PrepareVaeConfig(Settings):
    source: str | None = flag(None, "folder written by `regdit prepare images`", required=True)
    dest: str | None = flag(None, "folder for the fitted VAE (an AutoencoderKL.save_pretrained "
                                  "folder, for --vae)", required=True)
    steps: int = flag(1200, "training steps", at_least=1)
    batch_size: int = flag(8, "images per step", at_least=1)
    seed: int = flag(0, "seed of the initial weights and the batches", at_least=0)


def prepare_vae(config: PrepareVaeConfig):
    """Fit a small VAE (regdit.storage.vae.fit_vae) to a `prepare images` folder, for data no
    pretrained VAE covers; pass DEST as --vae to `prepare latents`. The weights are saved once
    fitted, with DEST/fit.json last, so an interrupted run leaves no VAE that passes for done and
    its rerun fits again. Returns dest."""
    source, dest = os.path.abspath(config.source), os.path.abspath(config.dest)
    check_paths(config.source, config.dest, "folder")
    names, _, _, resolution = read_image_folder(source)
    if resolution % 4:
        raise RegditError(f"{source}: {resolution} px images do not tile into the VAE's 4x4 latent "
                          "cells; prepare the images at a multiple of 4 px")
    settings = {"source": source, "num_images": len(names), "resolution": resolution,
                "steps": config.steps, "batch_size": config.batch_size, "seed": config.seed,
                FOLDER: dest}
    finished_path = os.path.join(dest, "fit.json")
    with RunLock(dest, "prepare vae"), writing_into(dest):
        if claim_dest(dest, settings, finished_path):
            print(f"{dest}: already prepared with these settings")
            return dest
        start_progress(dest, settings)
        images = np.stack([read_image(os.path.join(source, n), (resolution, resolution, 3))
                           for n in names])
        vae, loss = vae_lib.fit_vae(images, config.steps, config.batch_size, seed=config.seed)
        vae_lib.save_vae(vae, dest)
        write_json(finished_path, {"settings": settings, "final_loss": loss})
        shutil.rmtree(os.path.join(dest, PROGRESS))
    print(f"{dest}: VAE fitted to {len(names)} images ({resolution} px -> "
          f"{resolution // 4}x{resolution // 4}x4 latents), final loss {loss:.4f}; "
          f"pass --vae {dest}")
    return dest
