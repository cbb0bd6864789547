"""Image files: listing a folder and reading one prepared image, shared by `prepare latents`, the
official dataset reader, `sample` (packing its PNGs) and `eval` (image folders)."""
import os
import warnings

import numpy as np
import PIL.Image

from regdit import RegditError
from regdit.files import check_regular_file

CONVERT = "convert the folder with `regdit prepare images`"
# The most pixels an image may have: 3x ImageNet's largest (about 20 MP), more than 61 MP cameras
# and 64 MP phones give, below the 89.5 MP at which PIL warns of a decompression bomb. A 12 KB PNG
# can claim 10000x10000 pixels, which take over 1 GB to decode and crop; the size is read from the
# header before any pixel is decoded.
MAX_PIXELS = 8192 * 8192
PIXEL_LIMIT = f"regdit's limit of 8192x8192 pixels ({MAX_PIXELS / 1e6:.0f} megapixels)"


class ImageTooLarge(ValueError):
    """An image whose header claims more than MAX_PIXELS pixels, refused before it is decoded."""


def image_extensions():
    """The file extensions PIL can open (".png", ".jpg", ...)."""
    PIL.Image.init()
    return set(PIL.Image.EXTENSION)


def list_files(root, extensions=None):
    """Sorted '/'-separated paths relative to `root` of the files with these extensions (default:
    images), the order of the official reader."""
    extensions = image_extensions() if extensions is None else extensions
    found = []
    for folder, _, names in os.walk(root):
        found += [os.path.relpath(os.path.join(folder, n), root).replace(os.sep, "/") for n in names
                  if os.path.splitext(n)[1].lower() in extensions]
    return sorted(found)


def open_image(file):
    """`PIL.Image.open(file)`, lazily as PIL opens, refusing an image over MAX_PIXELS with
    ImageTooLarge from the size in its header; PIL's own DecompressionBombError (above 179 MP, and
    not an OSError) becomes one too."""
    # PIL warns from 89.5 MP: those images are refused below, in one line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        try:
            image = PIL.Image.open(file)
        except PIL.Image.DecompressionBombError:
            raise ImageTooLarge(f"over {2 * PIL.Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels, "
                                f"above {PIXEL_LIMIT}") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise ImageTooLarge(f"{width}x{height} pixels, above {PIXEL_LIMIT}")
    return image


def read_image(path, shape=None):
    """uint8 RGB pixels (H, W, 3) of a prepared image; `shape` (H, W, 3), when given, must match.
    Anything else (not a regular file, unreadable, over MAX_PIXELS, not 8-bit RGB, another size) is
    a one-line RegditError naming the file."""
    try:
        check_regular_file(path)
        with open_image(path) as image:
            mode = image.mode
            pixels = np.asarray(image) if mode == "RGB" else None
    except RegditError:  # a ValueError too: said as it is
        raise
    except ImageTooLarge as error:
        raise RegditError(f"{path} is {error}; downscale or remove it") from None
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        # PIL's unreadable, truncated or foreign file, or a GIF frame or TIFF tile over PIL's limit
        # (while decoding)
        raise RegditError(f"{path} is not a readable image ({type(error).__name__}: {error}); "
                          "remove or replace it") from None
    if pixels is None:
        raise RegditError(f"{path} is {mode}, not 8-bit RGB; {CONVERT}")
    if shape is not None and pixels.shape != tuple(shape):
        raise RegditError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, expected "
                          f"{shape[1]}x{shape[0]} like the first image; {CONVERT}")
    return pixels
