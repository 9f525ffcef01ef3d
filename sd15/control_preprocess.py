"""Control images made from an ordinary image by rule, with no network: Canny edges and the inpaint condition.

ControlNet 1.1's annotators (lllyasviel/ControlNet-v1-1-nightly, `annotator/`) turn a photo into the kind of
image each ControlNet was trained on. Two of them are plain image processing, and are reproduced here:

- `canny(image, low=100, high=200)`: the edge map of control_v11p_sd15_canny / control_sd15_canny. The annotator
  is `cv2.Canny(img, low, high)` on the (H, W, 3) uint8 RGB image, stacked to three channels; `canny_edges`
  re-derives OpenCV's algorithm in numpy and gives its output bit for bit (tests/test_control_preprocess.py
  compares it with OpenCV itself).
- `inpaint_condition(image, mask)`: the control image of control_v11p_sd15_inpaint: the image in [0, 1] with the
  masked pixels set to -1, diffusers' `make_inpaint_condition`.

The others (depth, normals, pose, lineart, soft edges, segmentation, …) each run a network of their own and are
not here: give their output as the control image.

Both work on the image as given, at its own size. The pipeline resizes Canny's edge map (a PIL image) to the
output's size as it does any control image (diffusers' examples do the same: Canny on the input image, resize in
the pipeline); the inpaint condition is a tensor, which is not resized: it must have the output's size already.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from PIL import Image

from .controlnet import control_rgb
from .images import _to_pil_rgb

CANNY_LOW, CANNY_HIGH = 100, 200  # the ControlNet 1.1 demo's and the web UI extension's default thresholds
MAX_MAGNITUDE = 2040  # the largest L1 gradient |dx| + |dy| of a uint8 image (1020 + 1020): no edge is stronger
TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)  # tan 22.5° = √2 − 1 in 15-bit fixed point: 13573
MASKED = -1.0  # what the inpaint ControlNet reads at a masked pixel


# --------------------------------------------------------------------------------------------------
# Canny


def canny(image, low: float = CANNY_LOW, high: float = CANNY_HIGH) -> Image.Image:
    """The Canny edge map ControlNet's annotator makes of `image`: white edges on black, an RGB PIL image.

    `image`: a PIL image of any mode, read as control images are (`control_rgb`: as shown, EXIF rotation applied,
    16-bit scaled to 8, transparency black), or a uint8 array (H, W), (H, W, 3) RGB or (H, W, 4) RGBA. The
    annotator receives the image as RGB; the channel order matters a little (on a tie between channels OpenCV
    keeps the first), so give RGB, not OpenCV's BGR. `low`, `high`: the hysteresis thresholds on the gradient
    magnitude |dx| + |dy| (0 to 2040), swapped if low > high, as cv2.Canny does.
    """
    edges = canny_edges(_uint8_image(image), low, high)  # (H, W) 0 or 255
    return Image.fromarray(edges).convert("RGB")  # the annotator's HWC3: the same map in all three channels


def canny_edges(image: np.ndarray, low: float = CANNY_LOW, high: float = CANNY_HIGH) -> np.ndarray:
    """cv2.Canny(image, low, high) (apertureSize=3, L2gradient=False) in numpy: uint8 (H, W) or (H, W, C) ->
    uint8 (H, W), 255 on edges and 0 elsewhere, equal to OpenCV's bit for bit.

    John Canny's detector (1986, "A Computational Approach to Edge Detection") as OpenCV's
    `modules/imgproc/src/canny.cpp` computes it, in integers throughout:

    1. Gradient: 3×3 Sobel filters, dx = [-1 0 1; -2 0 2; -1 0 1] and dy its transpose, with the image's edge
       pixels repeated outwards (BORDER_REPLICATE). Exact integers in [-1020, 1020].
    2. Magnitude: the L1 norm |dx| + |dy|. A colour pixel keeps the channel whose magnitude is largest (the
       first one on a tie), with that channel's dx and dy.
    3. Non-maximum suppression: a pixel survives if it is a peak across the edge, along its gradient's direction
       rounded to horizontal, vertical or one of the two diagonals (`_peaks`). Outside the image the magnitude is 0.
    4. Double threshold: survivors with magnitude > floor(low) are edge candidates; those > floor(high) are
       certain edges.
    5. Hysteresis: a candidate is an edge if a chain of candidates, each touching the next (8-connected), joins
       it to a certain edge (`_hysteresis`).
    """
    low, high = _threshold(low, "low"), _threshold(high, "high")
    low, high = min(low, high), max(low, high)  # cv2.Canny swaps them
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3) or 0 in image.shape:
        raise ValueError("canny_edges takes a uint8 array (H, W) or (H, W, C), as cv2.Canny does; got "
                         + (f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__))  # fmt: skip
    if image.ndim == 2:
        image = image[:, :, None]  # (H, W, 1)

    dx, dy = _sobel(image)  # (H, W, C) each
    magnitude = np.abs(dx) + np.abs(dy)  # (H, W, C), 0 … 2040
    if image.shape[-1] > 1:  # the strongest channel of each pixel; argmax takes the first of equals, as OpenCV
        strongest = magnitude.argmax(axis=-1)[..., None]  # (H, W, 1)
        magnitude, dx, dy = (np.take_along_axis(a, strongest, axis=-1) for a in (magnitude, dx, dy))
    magnitude, dx, dy = magnitude[..., 0], dx[..., 0], dy[..., 0]  # (H, W)

    candidate = (magnitude > low) & _peaks(magnitude, dx, dy)
    strong = candidate & (magnitude > high)
    return np.where(_hysteresis(candidate, strong), np.uint8(255), np.uint8(0))


def _threshold(value, name: str) -> int:
    """A threshold as OpenCV uses it: floor(value), an integer compared with integer magnitudes."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"the Canny {name} threshold must be a number >= 0 (the gradient magnitude |dx| + |dy| "
                         f"runs from 0 to {MAX_MAGNITUDE}; ControlNet's annotator uses {CANNY_LOW} and {CANNY_HIGH}), "
                         f"got {value!r}")  # fmt: skip
    return min(math.floor(value), MAX_MAGNITUDE)  # above the largest magnitude every threshold is the same


def _sobel(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, C) uint8 -> dx, dy (H, W, C) int32: OpenCV's 3×3 Sobel derivatives with BORDER_REPLICATE.

    The 3×3 kernel is separable: a central difference [-1 0 1] in one direction, a [1 2 1] smoothing in the
    other, so each is two shifted sums of the padded image.
    """
    p = np.pad(image.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")  # (H+2, W+2, C), edges repeated
    across = p[:, 2:] - p[:, :-2]  # (H+2, W, C): right − left
    dx = across[:-2] + 2 * across[1:-1] + across[2:]  # smoothed over rows 1 2 1 -> (H, W, C)
    along = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]  # (H+2, W, C): smoothed over columns 1 2 1
    dy = along[2:] - along[:-2]  # below − above -> (H, W, C)
    return dx, dy


def _peaks(magnitude: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Non-maximum suppression: (H, W) magnitude and gradient -> (H, W) bool, True where the magnitude is a peak
    along the gradient (across the edge).

    The gradient direction is rounded to one of four: within 22.5° of horizontal, of vertical, or else one of the
    diagonals. OpenCV tests the angle without division or arctangent, with integers only, so every machine gives
    the same answer: |dy| / |dx| < tan 22.5° becomes |dy| · 2^15 < |dx| · TG22, where TG22 = round(tan 22.5° · 2^15).
    Vertical is |dy| / |dx| > tan 67.5°, and since tan 67.5° = √2 + 1 = tan 22.5° + 2, the same product serves:
    |dy| · 2^15 > |dx| · TG22 + |dx| · 2^16. (The largest products, 1020 · 2^15 and 1020 · (TG22 + 2^16), fit in
    32 bits.)

    Along the chosen direction the pixel must beat both neighbours. OpenCV's comparisons are not symmetric:
    horizontally and vertically the pixel must be greater than the left (upper) neighbour but only at least equal
    to the right (lower) one, so a ridge two pixels wide of equal magnitude keeps its left (upper) pixel; on the
    diagonals both comparisons are strict. The diagonal is the one the gradient points along: up-left/down-right
    when dx and dy have the same sign (zero counts as positive, as OpenCV's sign test `(dx ^ dy) < 0` does),
    up-right/down-left otherwise. Beyond the image the magnitude is taken as 0.
    """
    H, W = magnitude.shape
    m = np.pad(magnitude, 1)  # (H+2, W+2), zeros around

    def neighbour(di: int, dj: int) -> np.ndarray:  # the magnitude of the neighbour at (i + di, j + dj), (H, W)
        return m[1 + di : 1 + di + H, 1 + dj : 1 + dj + W]

    centre = neighbour(0, 0)
    x, y = np.abs(dx), np.abs(dy) << 15  # |dx|, |dy| · 2^15
    tg22x = x * TG22
    horizontal = y < tg22x  # |dy| / |dx| < tan 22.5°: the gradient is horizontal, the edge vertical
    vertical = ~horizontal & (y > tg22x + (x << 16))  # |dy| / |dx| > tan 67.5°
    same_sign = (dx ^ dy) >= 0  # the gradient points down-right or up-left (y grows downwards)

    across_horizontal = (centre > neighbour(0, -1)) & (centre >= neighbour(0, 1))
    across_vertical = (centre > neighbour(-1, 0)) & (centre >= neighbour(1, 0))
    across_main_diagonal = (centre > neighbour(-1, -1)) & (centre > neighbour(1, 1))
    across_other_diagonal = (centre > neighbour(-1, 1)) & (centre > neighbour(1, -1))
    diagonal = np.where(same_sign, across_main_diagonal, across_other_diagonal)
    return np.where(horizontal, across_horizontal, np.where(vertical, across_vertical, diagonal))


def _hysteresis(candidate: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """(H, W) bool candidates and strong pixels -> (H, W) bool: the candidates 8-connected to a strong pixel.

    OpenCV grows the edges from each strong pixel with a stack, one pixel at a time. The result depends only on
    connectivity: a candidate is kept when its connected component (of candidates, 8-neighbours touching)
    holds a strong pixel. A pixel-by-pixel flood fill in Python takes seconds on a 512×512 image, and growing the
    strong set by repeated dilation takes as many passes as the longest chain of candidates is long, so the
    components are found instead with a union-find done in whole-array steps ("hook and shortcut", as in
    Shiloach & Vishkin 1982, "An O(log n) parallel connectivity algorithm"):

    - every candidate is a node, every pair of touching candidates an edge; each node points to a parent,
      at first itself (a root), and a parent always has a smaller index than its child;
    - hook: for every edge whose two ends have different roots, the larger root is pointed at the smaller
      (when several edges hook the same root, it takes the smallest);
    - shortcut: parent = parent[parent] until every node points straight at its root.

    Every component that touches another merges with at least one of them each round, so the number of
    roots of a component halves at least: a few rounds, whatever the edges' shapes.
    """
    H, W = candidate.shape
    count = int(candidate.sum())
    node = np.full((H + 2, W + 2), -1, dtype=np.int64)  # node number of each candidate, -1 elsewhere and around
    node[1:-1, 1:-1][candidate] = np.arange(count)
    here = node[1:-1, 1:-1]
    ends = []  # edges to the right, down-left, down and down-right cover every touching pair once
    for di, dj in ((0, 1), (1, -1), (1, 0), (1, 1)):
        there = node[1 + di : 1 + di + H, 1 + dj : 1 + dj + W]
        both = (here >= 0) & (there >= 0)
        ends.append((here[both], there[both]))
    u, v = np.concatenate([a for a, _ in ends]), np.concatenate([b for _, b in ends])

    parent = np.arange(count)
    while True:
        ru, rv = parent[u], parent[v]  # roots: parent is fully shortcut here
        apart = ru != rv
        if not apart.any():
            break
        u, v, ru, rv = u[apart], v[apart], ru[apart], rv[apart]  # joined pairs stay joined: drop them
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))  # hook
        while True:  # shortcut
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand

    has_strong = np.zeros(count, dtype=bool)
    has_strong[parent[strong[candidate]]] = True  # the roots of components holding a strong pixel
    edges = np.zeros((H, W), dtype=bool)
    edges[candidate] = has_strong[parent]
    return edges


def _uint8_image(image) -> np.ndarray:
    """A PIL image or uint8 array -> uint8 (H, W) or (H, W, 3) RGB, read as control images are (control_rgb).

    A grey array stays one channel: Canny on it equals Canny on its three equal RGB channels, and is faster.
    """
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3):
            return image
        if image.ndim == 3 and image.shape[-1] == 4:
            return np.asarray(control_rgb(Image.fromarray(image)))
        raise ValueError(f"a uint8 image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {image.shape}")
    if isinstance(image, Image.Image):
        return np.asarray(control_rgb(image))
    what = f"a {image.dtype} array" if isinstance(image, np.ndarray) else type(image).__name__
    raise ValueError(f"give a PIL image or a uint8 array (H, W), (H, W, 3) or (H, W, 4), got {what}"
                     + (" (open files with PIL.Image.open)" if isinstance(image, str) else ""))  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Inpaint condition


def inpaint_condition(image, mask) -> torch.Tensor:
    """The control image of control_v11p_sd15_inpaint: (1, 3, H, W) float32, the image in [0, 1], -1 where masked.

    As diffusers' `make_inpaint_condition` (its ControlNet docs): the image as RGB / 255, and every pixel whose
    mask value is > 0.5 (mask read as grey / 255: 128 and up of 255) set to -1 in all three channels. The
    ControlNet was trained on such images: -1 tells it "to be filled", which no colour in [0, 1] can say.

    `image`: a PIL image or a uint8 array (H, W, 3|4), read as sd15's inpainting reads its image (transparency
    white). `mask`: white where the image is to be repainted, in any form sd15's inpainting takes (a grey PIL
    image, an array or a tensor, sd15.inpaint.mask_tensor), of the image's size. For 8- and 16-bit masks
    "> 0.5" marks the same pixels as inpainting's ">= 0.5"; a float mask of exactly 0.5 is kept here.
    Pass the result as `control_image`; at the output's size already, since a tensor is not resized.
    """
    from .inpaint import mask_tensor  # here: sd15.inpaint imports the pipeline, which imports much

    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        what = f"a {image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"inpaint_condition takes the image as a PIL image or a uint8 array (H, W), (H, W, 3) or (H, W, 4), got {what}")
    rgb = np.asarray(_to_pil_rgb(image), dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]
    masked = mask_tensor(mask)[0, 0].numpy() > 0.5  # (H, W)
    if masked.shape != rgb.shape[:2]:
        (h, w), (H, W) = masked.shape, rgb.shape[:2]
        raise ValueError(f"the mask is {w}×{h} but the image is {W}×{H}; give a mask of the image's size")
    rgb[masked] = MASKED
    return torch.from_numpy(rgb).permute(2, 0, 1)[None]  # (1, 3, H, W)
