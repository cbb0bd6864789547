"""Image files: listing a folder and reading one prepared image, shared by `prepare latents`, the official dataset
reader, `sample` (packing its PNGs) and `eval` (image folders)."""
import os

import numpy as np
import PIL.Image

from regdit import RegditError

CONVERT = "convert the folder with `regdit prepare images`"


def image_extensions():
    """The file extensions PIL can open (".png", ".jpg", ...)."""
    PIL.Image.init()
    return set(PIL.Image.EXTENSION)


def list_files(root, extensions=None):
    """Sorted '/'-separated paths relative to `root` of the files with these extensions (default: images), the
    order of the official reader."""
    extensions = image_extensions() if extensions is None else extensions
    found = []
    for folder, _, names in os.walk(root):
        found += [os.path.relpath(os.path.join(folder, n), root).replace(os.sep, "/") for n in names
                  if os.path.splitext(n)[1].lower() in extensions]
    return sorted(found)


def read_image(path, shape=None):
    """uint8 RGB pixels (H, W, 3) of a prepared image; `shape` (H, W, 3), when given, must match. Anything else
    (unreadable, not 8-bit RGB, another size) is a one-line RegditError naming the file."""
    try:
        with PIL.Image.open(path) as image:
            if image.mode != "RGB":
                raise RegditError(f"{path} is {image.mode}, not 8-bit RGB; {CONVERT}")
            pixels = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as error:  # PIL's unreadable, truncated or foreign file
        raise RegditError(f"{path} is not a readable image ({type(error).__name__}: {error}); remove or replace "
                          "it") from None
    if shape is not None and pixels.shape != tuple(shape):
        raise RegditError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, expected {shape[1]}x{shape[0]} like the "
                          f"first image; {CONVERT}")
    return pixels
