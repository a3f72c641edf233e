"""PNG figures: the sample grid and the progressive generation strip (paper Fig. 6).

Images are tiled as torchvision.utils.make_grid tiles them (numpy here: importing torchvision
costs a stage ~1.5 s) and captioned with Pillow; small images are
enlarged (nearest neighbour) to at least ``MIN_SIDE`` pixels so that a 16x16 sample is visible.
Every figure is written atomically. (The evaluate stage adds Fig. 7/8 and rate-distortion here.)
"""

from __future__ import annotations

import math
import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.atomic import atomic_path

MIN_SIDE = 32  # smallest displayed image side in pixels
PAD = 2  # pixels between tiles
MIN_CAPTION_WIDTH = 320  # narrower figures get white margins so the caption stays readable


def _enlarge(images: np.ndarray) -> np.ndarray:
    """uint8 [N, R, R, 3] -> uint8 [N, R*k, R*k, 3] with k = ceil(MIN_SIDE / R)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise TypeError(f"expected uint8 images [N, R, R, 3], got {images.dtype} {images.shape}")
    k = max(1, math.ceil(MIN_SIDE / images.shape[1]))
    return images.repeat(k, axis=1).repeat(k, axis=2)


def tile(images: np.ndarray, nrow: int) -> Image.Image:
    """A grid of uint8 images [N, R, R, 3], ``nrow`` images per row, as a Pillow image: white
    ``PAD``-pixel gaps and border, the layout of ``torchvision.utils.make_grid(padding=PAD,
    pad_value=255)``, one image alone unpadded (tests/test_sampling.py compares them)."""
    x = _enlarge(images)
    n, h, w, _ = x.shape
    if n == 1:  # make_grid returns a single image as it is
        return Image.fromarray(np.ascontiguousarray(x[0]))
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + PAD) + PAD, cols * (w + PAD) + PAD, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = r * (h + PAD) + PAD, c * (w + PAD) + PAD
        grid[top : top + h, left : left + w] = x[i]
    return Image.fromarray(grid)


def captioned(image: Image.Image, caption: str) -> Image.Image:
    """``image`` centred below ``caption`` (black on white, wrapped to the figure's width)."""
    font = ImageFont.load_default()
    width = max(image.width, MIN_CAPTION_WIDTH)
    char_width = font.getlength(caption.replace("\n", " ")) / max(len(caption), 1)
    chars = max(16, int((width - 8) / max(char_width, 1.0)) - 2)
    lines = [ln for part in caption.splitlines() for ln in textwrap.wrap(part, chars) or [""]]
    height = int(font.getbbox("Ag")[3]) + 3
    top = height * len(lines) + 6
    canvas = Image.new("RGB", (width, image.height + top), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 3 + height * i), line, fill="black", font=font)
    canvas.paste(image, ((width - image.width) // 2, top))
    return canvas


def save_png(path: str | os.PathLike, image: Image.Image) -> None:
    """Write ``image`` as PNG, atomically."""
    with atomic_path(path, ".png") as tmp:
        image.save(tmp, format="PNG")


def save_sample_grid(path: str | os.PathLike, images: np.ndarray, title: str) -> None:
    """A square-ish grid of samples uint8 [N, R, R, 3] with a title (e.g. the sampler label)."""
    nrow = max(1, math.ceil(math.sqrt(len(images))))
    save_png(path, captioned(tile(images, nrow), title))


def save_progressive(
    path: str | os.PathLike, frames: np.ndarray, t: np.ndarray | list[int], title: str
) -> None:
    """Fig. 6: one row per sample, x_0 predictions from t = T (left) to t = 1 (right).

    ``frames`` is uint8 [S, F, R, R, 3]; ``t`` the F timesteps (1-based) of the columns.
    """
    S, F = frames.shape[:2]
    strip = tile(frames.reshape(S * F, *frames.shape[2:]), nrow=F)
    steps = ", ".join(str(int(v)) for v in t)
    save_png(path, captioned(strip, f"{title}\nx_0 predicted from x_t, columns t = {steps}"))
