"""`regdit prepare images|latents`: raw images -> square RGB PNGs + labels -> VAE posterior moments.

Both steps are resumable: finished work is recorded atomically (a file is written under a temporary name, then
renamed), so rerunning the same command after a kill continues where it stopped. `prepare latents` runs on every
process of `accelerate launch` / `torchrun`, each encoding its own shards.
"""
import functools
import json
import multiprocessing
import os
import shutil
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

from regdit import RegditError, atomic_write, cpu_launch
from regdit import vae as vae_lib
from regdit.data import (FORMAT, IMAGES, LABELS, META, MOMENTS, MOMENTS_FLIP, OFFICIAL_LATENTS, PROGRESS,
                         image_extensions, list_files, official_images_dir, read_json)


def add_arguments(parser):
    commands = parser.add_subparsers(dest="prepare_command", required=True)
    from regdit.cli import HelpFormatter as formatter  # imported here: the CLI imports this module
    images = commands.add_parser("images", formatter_class=formatter, allow_abbrev=False,
                                 help="raw image folder/zip -> square RGB PNGs + dataset.json labels")
    images.add_argument("--source", required=True,
                        help="folder or .zip of images; labels from its dataset.json, else from the sorted top-level "
                             "folder names (ImageNet synset folders give the standard 0..999)")
    images.add_argument("--dest", required=True, help="output folder")
    images.add_argument("--resolution", type=int, default=256, help="side of the square output images")
    images.add_argument("--transform", choices=list(TRANSFORMS), default="center-crop-dhariwal",
                        help="center-crop-dhariwal: ADM's crop (the official setting); center-crop: largest centred "
                             "square, LANCZOS resize")
    images.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes (0: in-process)")
    images.add_argument("--strict", action="store_true", help="fail on the first unreadable image instead of "
                                                              "skipping it")
    latents = commands.add_parser("latents", formatter_class=formatter, allow_abbrev=False,
                                  help="images -> VAE posterior moments (batched, multi-GPU, resumable)")
    latents.add_argument("--source", required=True, help="folder written by `regdit prepare images` (or the "
                                                         "official dataset_tools.py convert)")
    latents.add_argument("--dest", required=True, help="dataset folder to write")
    latents.add_argument("--vae", default="mse", help="ema, mse, a Hub id, a save_pretrained folder, or none "
                                                      "(pixel space)")
    latents.add_argument("--batch-size", type=int, default=64, help="images per encoder call and process")
    latents.add_argument("--flip", action="store_true", help="also store the moments of the mirrored images "
                                                             "(random flips in training)")
    latents.add_argument("--layout", choices=["regdit", "official"], default="regdit",
                         help="regdit: memory-mapped arrays in DEST; official: DEST/imagenet_{R}_vae + DEST/vae-sd")
    latents.add_argument("--shard-size", type=int, default=1024, help="images per resumable unit of work")
    latents.add_argument("--workers", type=int, default=min(8, os.cpu_count()), help="PNG decoding workers per "
                                                                                      "process (0: in-process)")


def main(args):
    if args.prepare_command == "images":
        prepare_images(args.source, args.dest, args.resolution, args.transform, workers=args.workers,
                       strict=args.strict)
    else:
        prepare_latents(args.source, args.dest, vae=args.vae, batch_size=args.batch_size, flip=args.flip,
                        layout=args.layout, shard_size=args.shard_size, workers=args.workers)


# ------------------------------------------------------------------------------------------------ crops


def center_crop_dhariwal(image, resolution):
    """ADM's center_crop_arr (guided-diffusion image_datasets.py), the official `--transform=center-crop-dhariwal`."""
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


# ------------------------------------------------------------------------------------------------ resumable output


def write_json(path, obj):
    with atomic_write(path, "w") as f:
        json.dump(obj, f)


def claim_dest(out, settings, finished_path):
    """Check that `out` is new or holds a run with the same settings; True when that run has finished."""
    settings_path = os.path.join(out, PROGRESS, "settings.json")
    fix = f"use a new --dest or delete {out}"
    if os.path.isfile(settings_path):
        previous = read_json(settings_path, fix)
    elif os.path.isfile(finished_path):
        previous = read_json(finished_path, fix).get("settings")
    elif os.path.isdir(out) and os.listdir(out):
        raise RegditError(f"{out} is not empty and holds no regdit prepare output; {fix}")
    else:
        return False
    if previous != settings:
        changed = sorted(k for k in settings if (previous or {}).get(k) != settings[k])
        raise RegditError(f"{out} holds a run with other settings ({', '.join(changed) or 'unknown'}); {fix}")
    return not os.path.isfile(settings_path)


def start_progress(out, settings):
    os.makedirs(os.path.join(out, PROGRESS), exist_ok=True)
    write_json(os.path.join(out, PROGRESS, "settings.json"), settings)


def image_name(index):
    return f"{index:08d}"[:5] + f"/img{index:08d}.png"  # the official dataset_tools.py naming


# ------------------------------------------------------------------------------------------------ prepare images


@functools.lru_cache(maxsize=1)
def _open_zip(path):  # one central directory read per process, not per image
    return zipfile.ZipFile(path)


def _open_source(source, name):
    return open(os.path.join(source, name), "rb") if os.path.isdir(source) else _open_zip(source).open(name)


def source_labels(source, names):
    """(labels, class names): the source's dataset.json, else the sorted top-level folder names (like EDM2)."""
    try:
        with _open_source(source, "dataset.json") as f:
            meta = json.load(f)
    except (FileNotFoundError, KeyError):  # a folder / zip without dataset.json
        meta = {}
    if meta.get("labels") is not None:
        labels = dict(meta["labels"])
        missing = [n for n in names if n not in labels]
        if missing or not all(isinstance(labels[n], int) and labels[n] >= 0 for n in names):
            raise RegditError(f"{source}/dataset.json: {len(missing)} images have no label (first: "
                              f"{missing[:1]}) or labels are not integers >= 0; fix it or remove dataset.json to "
                              f"label by folder name")
        return [labels[n] for n in names], meta.get("classes")
    folders = [n.split("/")[0] if "/" in n else "" for n in names]
    classes = sorted(set(folders))  # one folder, or none: a single class 0
    index = {c: i for i, c in enumerate(classes)}
    return [index[f] for f in folders], classes


def _convert(job):
    """Convert one image; returns (index, None) or (index, why it was skipped). Runs in the worker processes."""
    index, source, name, out_path, resolution, transform = job
    try:
        with _open_source(source, name) as f, PIL.Image.open(f) as image:
            image = image.convert("RGB")  # grayscale, RGBA, palette, CMYK... as the official convert does
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        return index, f"{type(error).__name__}: {error}"
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    # Uncompressed PNG like the official converter: larger files, but decoding is cheap.
    with atomic_write(out_path, sync=False) as f:
        PIL.Image.fromarray(TRANSFORMS[transform](image, resolution)).save(f, format="png", compress_level=0)
    return index, None


def prepare_images(source, dest, resolution, transform="center-crop-dhariwal", workers=os.cpu_count(),
                   strict=False):
    """Crop and resize every image of a folder or zip to resolution^2 RGB PNGs with a dataset.json of labels.

    Output names follow the source's sorted order, `{i:08d}[:5]/img{i:08d}.png`, like the official converter;
    unreadable images are skipped with a line on stderr (their index stays unused) or, with strict, raise.
    Returns {"images", "converted", "skipped" (names), "num_classes"}.
    """
    source, dest = os.path.abspath(source), os.path.abspath(dest)
    if resolution < 1:
        raise RegditError(f"--resolution {resolution}: use a positive image size such as 256")
    if transform not in TRANSFORMS:
        raise RegditError(f"--transform {transform}: use one of {list(TRANSFORMS)}")
    if os.path.commonpath([source, dest]) == source:
        raise RegditError(f"--dest {dest} lies inside --source {source}; write the images elsewhere")
    if os.path.isdir(source):
        names = list_files(source, image_extensions())
    elif zipfile.is_zipfile(source):
        names = sorted(n for n in _open_zip(source).namelist() if os.path.splitext(n)[1].lower() in image_extensions())
    else:
        raise RegditError(f"{source} is neither a folder nor a zip file; pass the image folder or .zip as --source")
    if not names:
        raise RegditError(f"{source} contains no images ({', '.join(sorted(image_extensions())[:6])}, ...)")
    labels, classes = source_labels(source, names)
    settings = {"source": source, "resolution": resolution, "transform": transform}
    claim_dest(dest, settings, os.path.join(dest, "dataset.json"))
    start_progress(dest, settings)

    done = set(list_files(dest, {".png"}))
    jobs = [(i, source, n, os.path.join(dest, image_name(i)), resolution, transform)
            for i, n in enumerate(names) if image_name(i) not in done]
    skipped = []
    with multiprocessing.Pool(workers) if workers else _InProcess() as pool:
        for index, error in tqdm(pool.imap_unordered(_convert, jobs, chunksize=16), total=len(jobs),
                                 desc="prepare images", unit="img"):
            if error and strict:
                raise RegditError(f"{source}/{names[index]}: unreadable image ({error}); remove or replace it, or "
                                  f"drop --strict to skip it")
            if error:
                # tqdm.write keeps the progress bar below the line
                tqdm.write(f"skipping unreadable image {source}/{names[index]} ({error})", file=sys.stderr)
                skipped.append(names[index])
    if len(skipped) == len(names):
        raise RegditError(f"{source}: none of the {len(names)} images could be read; check the files")

    skipped_set = set(skipped)
    kept = [i for i, n in enumerate(names) if n not in skipped_set]
    num_classes = len(classes) if classes else max(labels) + 1
    write_json(os.path.join(dest, "dataset.json"),
               {"labels": [[image_name(i), labels[i]] for i in kept], "classes": classes, "skipped": sorted(skipped),
                "settings": settings})
    shutil.rmtree(os.path.join(dest, PROGRESS))
    summary = {"images": len(kept), "converted": len(jobs) - len(skipped), "skipped": sorted(skipped),
               "num_classes": num_classes}
    print(f"{dest}: {summary['images']} images of {resolution}x{resolution} in {num_classes} classes "
          f"({summary['converted']} converted now, {len(kept) - summary['converted']} by an earlier run), "
          f"{len(skipped)} unreadable skipped")
    return summary


class _InProcess:
    """The part of multiprocessing.Pool used above, without processes (workers=0: small jobs, debugging)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap_unordered(function, jobs, chunksize):
        return map(function, jobs)


# ------------------------------------------------------------------------------------------------ prepare latents


class SourceImages(torch.utils.data.Dataset):
    """The PNGs of a `prepare images` folder as uint8 (3, R, R) tensors."""

    def __init__(self, root, names, resolution):
        self.root, self.names, self.resolution = root, names, resolution

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        path = os.path.join(self.root, self.names[index])
        with PIL.Image.open(path) as image:
            array = np.array(image)
        if array.shape != (self.resolution, self.resolution, 3) or array.dtype != np.uint8:
            raise RegditError(f"{path}: {array.dtype} image of shape {list(array.shape)}, expected uint8 "
                              f"[{self.resolution}, {self.resolution}, 3] like the first image; convert the folder "
                              f"with `regdit prepare images`")
        return torch.from_numpy(array).permute(2, 0, 1)


def read_image_folder(source):
    """(names, labels, num_classes, resolution) of a folder written by `prepare images` / the official convert."""
    meta_path = os.path.join(source, "dataset.json")
    fix = f"run `regdit prepare images --dest {source}` first"
    meta = read_json(meta_path, fix) if os.path.isfile(meta_path) else {}
    if meta.get("labels") is None:
        raise RegditError(f"{meta_path}: missing or without labels; {fix}")
    labels = dict(meta["labels"])
    names = list_files(source, image_extensions())
    missing = [n for n in names if n not in labels]
    if not names or missing:
        raise RegditError(f"{meta_path}: {len(missing)} of {len(names)} images have no label (first: "
                          f"{missing[:1]}); {fix}")
    labels = [labels[n] for n in names]
    num_classes = len(meta["classes"]) if meta.get("classes") else max(labels) + 1
    with PIL.Image.open(os.path.join(source, names[0])) as image:
        if image.size[0] != image.size[1]:
            raise RegditError(f"{source}/{names[0]}: image is {image.size[0]}x{image.size[1]}, not square; {fix}")
        resolution = image.size[0]
    return names, labels, num_classes, resolution


class _RegditWriter:
    """Fills the preallocated arrays of regdit's layout row by row. Plain writes, not a shared memory map: processes
    on other nodes of a network file system then never rewrite each other's pages."""

    def __init__(self, out, flip):
        self.files = {}
        for name in (IMAGES, MOMENTS, MOMENTS_FLIP)[:2 + flip]:
            array = np.load(os.path.join(out, name), mmap_mode="r")
            row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:]))
            self.files[name] = (open(os.path.join(out, name), "r+b"), array.offset, row_bytes)

    def write(self, indices, images, moments, moments_flip):
        for name, rows in ((IMAGES, images), (MOMENTS, moments), (MOMENTS_FLIP, moments_flip)):
            if name in self.files:
                f, offset, row_bytes = self.files[name]
                f.seek(offset + indices[0] * row_bytes)  # batches are runs of consecutive indices
                f.write(np.ascontiguousarray(rows.numpy()).tobytes())

    def sync(self):  # the shard's rows must be on disk before its done-marker
        for f, _, _ in self.files.values():
            f.flush()
            os.fsync(f.fileno())

    def close(self):
        for f, _, _ in self.files.values():
            f.close()


class _OfficialWriter:
    """One (1, 2C, h, w) float32 .npy per image, named and shaped as the official dataset_tools.py encode saves a
    batch of one, plus a copy of each image where the official reader looks for it (images_out, unless None)."""

    def __init__(self, out, images_out, source, names):
        self.out, self.images_out, self.source, self.names = out, images_out, source, names

    def write(self, indices, images, moments, moments_flip):
        for index, m in zip(indices, moments.numpy()):
            path = os.path.join(self.out, official_latent_name(index))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.save(path, m[None])
            if self.images_out is not None:
                image_path = os.path.join(self.images_out, self.names[index])
                os.makedirs(os.path.dirname(image_path), exist_ok=True)
                shutil.copyfile(os.path.join(self.source, self.names[index]), image_path)

    def sync(self):  # many small files: a kill loses nothing written; an OS crash may need the run redone
        pass

    def close(self):
        pass


def shard_batches(num_images, shard_size, batch_size, shards):
    """Batches of consecutive indices that never straddle a shard, so a shard is done with its last batch."""
    return [list(range(start, min(start + batch_size, end)))
            for s in shards for end in [min((s + 1) * shard_size, num_images)]
            for start in range(s * shard_size, end, batch_size)]


def prepare_latents(source, dest, vae="mse", batch_size=64, flip=False, layout="regdit", shard_size=1024,
                    workers=min(8, os.cpu_count())):
    """Encode a `prepare images` folder to VAE posterior moments (float32 means then stds), with images and labels.

    layout "regdit": DEST/{regdit.json, images.npy, moments.npy[, moments_flip.npy], labels.npy} (see regdit.data);
    layout "official": DEST/imagenet_{R}_vae/ (the images) + DEST/vae-sd/{...npy, dataset.json}.
    Every process of an accelerate/torchrun launch encodes the shards of `shard_size` images with
    shard % num_processes == process index; finished shards are skipped on a rerun. Returns dest.
    """
    from accelerate import PartialState

    # accelerate picks gloo only when told the processes use the CPU: say so when launched without CUDA.
    state = PartialState(cpu=cpu_launch())
    source, dest = os.path.abspath(source), os.path.abspath(dest)
    if layout not in ("regdit", "official"):
        raise RegditError(f"--layout {layout}: use regdit or official")
    if layout == "official" and (flip or vae == "none"):
        raise RegditError("--layout official stores SD-VAE moments without mirrored copies: drop --flip and "
                          "--vae none, or use --layout regdit")
    names, labels, num_classes, resolution = read_image_folder(source)
    settings = {"source": source, "num_images": len(names), "resolution": resolution,
                "vae": vae_lib.resolve_vae_name(vae), "flip": flip, "layout": layout, "shard_size": shard_size}
    out = dest if layout == "regdit" else os.path.join(dest, OFFICIAL_LATENTS)
    finished_path = os.path.join(out, META if layout == "regdit" else "dataset.json")
    if claim_dest(out, settings, finished_path):  # every process checks before the main one writes anything
        if state.is_main_process:
            print(f"{dest}: already prepared with these settings")
        return dest
    images_out = None if layout == "regdit" else os.path.join(dest, official_images_dir(resolution))
    if images_out is not None and os.path.realpath(images_out) == os.path.realpath(source):
        images_out = None  # the images are already where the official reader looks
    elif images_out is not None and os.path.isdir(images_out) and not os.path.isdir(os.path.join(out, PROGRESS)):
        raise RegditError(f"{images_out} already exists: pass it as --source, or delete it to copy {source} there")

    vae_model = vae_lib.load_vae(vae, state.device)
    moments_shape = tuple(vae_lib.encode_moments(vae_model, torch.zeros(1, 3, resolution, resolution,
                                                                        dtype=torch.uint8)).shape[1:])
    if resolution % moments_shape[1]:
        raise RegditError(f"{source}: {resolution} px images give a {moments_shape[1]}x{moments_shape[2]} latent "
                          f"that does not tile them; prepare the images at a multiple of 8 px")
    state.wait_for_everyone()
    if state.is_main_process:
        start_progress(out, settings)
        if layout == "regdit":
            arrays = {IMAGES: ((3, resolution, resolution), np.uint8), MOMENTS: (moments_shape, np.float32),
                      MOMENTS_FLIP: (moments_shape, np.float32)}
            for name in list(arrays)[:2 + flip]:
                _preallocate(os.path.join(out, name), (len(names), *arrays[name][0]), arrays[name][1])
            with atomic_write(os.path.join(out, LABELS)) as f:
                np.save(f, np.array(labels, dtype=np.int64))
    state.wait_for_everyone()

    num_shards = -(-len(names) // shard_size)
    done_path = os.path.join(out, PROGRESS, "shard-{:06d}.done").format
    shards = [s for s in range(state.process_index, num_shards, state.num_processes) if not os.path.exists(done_path(s))]
    batches = shard_batches(len(names), shard_size, batch_size, shards)
    loader = torch.utils.data.DataLoader(SourceImages(source, names, resolution), batch_sampler=batches,
                                         num_workers=workers, pin_memory=state.device.type == "cuda")
    writer = _RegditWriter(out, flip) if layout == "regdit" else _OfficialWriter(out, images_out, source, names)
    processes = f"{state.num_processes} process{'es' * (state.num_processes > 1)}"
    def save(indices, images, moments):
        writer.write(indices, images, *(moments.chunk(2) if flip else (moments, None)))
        if indices[-1] + 1 == min((indices[-1] // shard_size + 1) * shard_size, len(names)):  # shard complete
            writer.sync()
            write_json(done_path(indices[-1] // shard_size), {})
        progress.update(len(indices))

    # One writer thread: batch k is written while batch k+1 is encoded (+10% images/s measured on an H200).
    with tqdm(total=sum(map(len, batches)), desc=f"encode ({processes})", unit="img",
              disable=not state.is_main_process) as progress, ThreadPoolExecutor(1) as background:
        saved = background.submit(lambda: None)
        for indices, images in zip(batches, loader):
            moments = vae_lib.encode_moments(vae_model, torch.cat([images, images.flip(-1)]) if flip else images)
            moments = moments.cpu()
            saved.result()  # also raises the writer's errors here
            saved = background.submit(save, indices, images, moments)
        saved.result()
    writer.close()
    state.wait_for_everyone()

    if state.is_main_process:
        missing = [s for s in range(num_shards) if not os.path.exists(done_path(s))]
        if missing:
            raise RegditError(f"{out}: shards {missing[:5]} were not encoded; rerun the same command")
        if layout == "regdit":
            write_json(finished_path, {"format": FORMAT, "num_images": len(names), "resolution": resolution,
                                       "num_classes": num_classes, "vae": settings["vae"],
                                       "latent_scale": vae_lib.latent_scale(vae_model),
                                       "moments_shape": list(moments_shape), "flip": flip, "settings": settings})
        else:
            if images_out is not None:
                shutil.copyfile(os.path.join(source, "dataset.json"), os.path.join(images_out, "dataset.json"))
            write_json(finished_path, {"labels": [[official_latent_name(i), label] for i, label in enumerate(labels)],
                                       "settings": settings})
        shutil.rmtree(os.path.join(out, PROGRESS))
        print(f"{dest}: {len(names)} images, moments {list(moments_shape)}{' (+ mirrored)' if flip else ''}, "
              f"{num_classes} classes, {layout} layout")
    return dest


def _preallocate(path, shape, dtype):
    if not os.path.exists(path):  # the file is sparse until the shards fill it
        np.lib.format.open_memmap(path + ".tmp", mode="w+", dtype=dtype, shape=shape)
        os.replace(path + ".tmp", path)


def official_latent_name(index):
    return f"{index:08d}"[:5] + f"/img-mean-std-{index:08d}.npy"  # the official dataset_tools.py encode naming
