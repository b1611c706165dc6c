"""Image helpers the classical measures share (internal to ``medqc.analysis``: the names keep their
underscore): the CT numbers that mark padding and the body, distance from the image centre and the masks
made of it, block and window filters, and mask operations (holes, hulls, sectors), each with an OpenCV path
and a numpy-only one that gives the same or closely the same result.
"""

from __future__ import annotations

import math

import numpy as np

try:  # connected components make the body/lung masks cleaner; numpy alone still gives usable measures
    import cv2
except ImportError:  # pragma: no cover - exercised by the module-hider test
    cv2 = None


PAD_HU = -1500.0
BODY_HU = -400.0
PAD_FILL_MIN_PX = 20  # a padding value fills at least this many pixels (a streak's darkest value a handful)
PAD_EDGE_PX = 2  # pixels below PAD_HU this close to the fill are its edge (a resampled field's soft rim)

_GEOM_CACHE: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
_RADIUS_CACHE: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _radius(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Distance (px) of every pixel from the image centre, as floats and truncated to whole pixels (cached)."""
    g = _RADIUS_CACHE.get((h, w))
    if g is None:
        yy, xx = np.ogrid[0:h, 0:w]
        r = np.hypot(yy - (h - 1) / 2.0, xx - (w - 1) / 2.0)
        g = (r, r.astype(np.int32))
        if len(_RADIUS_CACHE) < 16:
            _RADIUS_CACHE[(h, w)] = g
    return g


def _edge_geometry(h: int, w: int, band: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean masks (subsampled grid): the FOV-edge band (the inscribed circle's rim, which also meets the
    image border at its four sides), the inscribed circle and the central disk (half its radius)."""
    key = (h, w, band)
    g = _GEOM_CACHE.get(key)
    if g is None:
        r = _radius(h, w)[0]
        rmax = min(h, w) / 2.0
        edge = (r >= rmax - band) & (r <= rmax + 0.5)
        inside = r <= rmax + 0.5
        g = (edge, inside, r <= rmax * 0.5)
        if len(_GEOM_CACHE) < 16:
            _GEOM_CACHE[key] = g
    return g


def _ring(h: int, w: int, r_px: float, band: int) -> np.ndarray:
    r = _radius(h, w)[0]
    return (r >= r_px - band) & (r <= r_px + 0.5)


def padding(img: np.ndarray) -> np.ndarray:
    """Boolean mask of the padding outside the reconstructed field: pixels below ``PAD_HU`` that hold the
    fill value. A scanner writes one value there (-2000, -2048, -3024 ..., or its PixelPaddingValue, which
    decoding maps to -3024), the lowest in the image. Values below ``PAD_HU`` that vary are image content:
    a reconstruction that does not clip its CT numbers at -1024 HU shows the dark streaks of motion or metal
    down to -1900 HU in the air around a head, and read as padding those made a scan field's edge inside
    the displayed circle, where the patient then "touched" it (truncation on every such slice). Pixels below
    ``PAD_HU`` within ``PAD_EDGE_PX`` of the fill count with it (a resampled field interpolates its rim)."""
    below = img < PAD_HU
    if not below.any():
        return below
    vals = img[below]
    vmin = vals.min()
    n_fill = int(np.count_nonzero(vals == vmin))
    if n_fill < PAD_FILL_MIN_PX:  # no fill value: the pixels below the level are content
        return np.zeros_like(below)
    if n_fill == vals.size:  # the usual case: every pixel below the level is the fill
        return below
    k = 2 * PAD_EDGE_PX + 1
    near = _min_max((img == vmin).view(np.uint8), k, k)[1].view(bool)
    return below & near


def _border_connected(pad: np.ndarray) -> np.ndarray:
    """The padded pixels connected to the image border: padding outside a scan field. Values below the
    padding level inside the picture (the darkest streaks of metal or motion on a scanner that does not
    clip at −1024) are not a field edge."""
    if cv2 is None:
        return pad
    n, lab = cv2.connectedComponents(pad.view(np.uint8), connectivity=8)
    if n <= 2:
        return pad
    ids = np.unique(np.concatenate((lab[0], lab[-1], lab[:, 0], lab[:, -1])))
    keep = np.zeros(n, bool)
    keep[ids[ids > 0]] = True
    return keep[lab]


def _median_index(counts: np.ndarray) -> float:
    """The median of the indices of a mask's pixels along one axis, from that axis's pixel counts (what
    ``np.median`` of their coordinates gives: the mean of the two middle ones for an even count)."""
    cum = np.cumsum(counts)
    n = int(cum[-1])
    lo = int(np.searchsorted(cum, (n - 1) // 2, side="right"))
    hi = int(np.searchsorted(cum, n // 2, side="right"))
    return (lo + hi) / 2.0


def _border_pixels(a: np.ndarray):
    """(y, x) of border pixels of ``a`` that are still 1 (unfilled background)."""
    h, w = a.shape
    ys, xs = [], []
    for y0, row in ((0, a[0]), (h - 1, a[-1])):
        x = np.flatnonzero(row == 1)
        ys.append(np.full(len(x), y0))
        xs.append(x)
    for x0, col in ((0, a[:, 0]), (w - 1, a[:, -1])):
        y = np.flatnonzero(col == 1)
        ys.append(y)
        xs.append(np.full(len(y), x0))
    return zip(np.concatenate(ys).tolist(), np.concatenate(xs).tolist())


def _trunk_hull(mask: np.ndarray, margin_px: float) -> np.ndarray:
    """The convex hull of ``mask``, shrunk by ``margin_px``."""
    pts = cv2.findNonZero(mask.view(np.uint8))
    out = np.zeros(mask.shape, np.uint8)
    if pts is None:
        return out.astype(bool)
    cv2.fillConvexPoly(out, cv2.convexHull(pts), 1)
    k = int(round(margin_px))
    if k >= 1:
        out = cv2.erode(out, np.ones((2 * k + 1, 2 * k + 1), np.uint8))
    return out.astype(bool)


def _holes(body: np.ndarray) -> np.ndarray:
    """Pixels enclosed by ``body`` (not reachable from the image border through non-body pixels)."""
    if cv2 is not None:
        outside = (~body).view(np.uint8).copy()
        h, w = outside.shape
        ff = np.zeros((h + 2, w + 2), np.uint8)
        # flood the background from every border pixel that is background (corners cover the usual case)
        for y, x in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)):
            if outside[y, x] == 1:
                cv2.floodFill(outside, ff, (x, y), 2)
        # background pockets on the border not connected to a corner (a body touching the image edge)
        for y, x in _border_pixels(outside):
            if outside[y, x] == 1:
                cv2.floodFill(outside, ff, (int(x), int(y)), 2)
        return outside == 1
    # numpy fallback: inside both the row span and the column span of the body
    rows = body.any(axis=1)
    cols = body.any(axis=0)
    h, w = body.shape
    left = np.where(rows, body.argmax(axis=1), w)
    right = np.where(rows, w - 1 - body[:, ::-1].argmax(axis=1), -1)
    top = np.where(cols, body.argmax(axis=0), h)
    bottom = np.where(cols, h - 1 - body[::-1, :].argmax(axis=0), -1)
    yy, xx = np.mgrid[0:h, 0:w]
    inside = (xx > left[:, None]) & (xx < right[:, None]) & (yy > top[None, :]) & (yy < bottom[None, :])
    return inside & ~body


def _erode_cross(mask: np.ndarray, r: int) -> np.ndarray:
    """``mask`` eroded ``r`` times by the 4-neighbour cross (numpy only: the fallback without OpenCV)."""
    out = mask.copy()
    for _ in range(r):
        out[1:, :] &= out[:-1, :].copy()
        out[:-1, :] &= out[1:, :].copy()
        out[:, 1:] &= out[:, :-1].copy()
        out[:, :-1] &= out[:, 1:].copy()
    return out


def _sectors(mask: np.ndarray, cy: float, cx: float) -> np.ndarray:
    """Which of the 24 angular sectors round (cy, cx) hold a pixel of ``mask`` (none for an empty one)."""
    dy_, dx_ = np.nonzero(mask)
    ang = np.arctan2(dy_ - cy, dx_ - cx)
    return np.bincount(((ang + math.pi) / (2 * math.pi) * 24).astype(int) % 24, minlength=24) > 0


def _sector_share(mask: np.ndarray, cy: float, cx: float) -> float:
    """Share of the 24 angular sectors round (cy, cx) that hold a pixel of ``mask`` (0 for an empty one)."""
    return np.count_nonzero(_sectors(mask, cy, cx)) / 24.0


def _block_all(m: np.ndarray, b: int) -> np.ndarray:
    """(h/b, w/b) booleans: every pixel of the b×b block of ``m`` (h, w multiples of b) is set."""
    h, w = m.shape
    if cv2 is not None:  # block minimum: erode with the block as kernel, anchored at its top-left pixel
        k = np.ones((b, b), np.uint8)
        return cv2.erode(m.view(np.uint8), k, anchor=(0, 0), borderType=cv2.BORDER_CONSTANT, borderValue=0)[::b, ::b] == 1
    return m.reshape(h // b, b, w // b, b).all(axis=(1, 3))


def _box(a: np.ndarray, k: int) -> np.ndarray:
    """k×k box mean (same size, edges replicated)."""
    if cv2 is not None:
        return cv2.blur(a, (k, k), borderType=cv2.BORDER_REPLICATE)
    p = k // 2
    c = np.pad(a, p, mode="edge").astype(np.float64).cumsum(0).cumsum(1)
    c = np.pad(c, ((1, 0), (1, 0)))
    h, w = a.shape
    return ((c[k:k + h, k:k + w] - c[:h, k:k + w] - c[k:k + h, :w] + c[:h, :w]) / (k * k)).astype(np.float32)


def _min_max(a: np.ndarray, kh: int, kw: int) -> tuple[np.ndarray, np.ndarray]:
    """Minimum and maximum over the kh×kw window around each pixel (odd sizes; edges replicated)."""
    if cv2 is not None:
        kern = np.ones((kh, kw), np.uint8)
        return cv2.erode(a, kern), cv2.dilate(a, kern)
    from numpy.lib.stride_tricks import sliding_window_view

    win = sliding_window_view(np.pad(a, ((kh // 2, kh // 2), (kw // 2, kw // 2)), mode="edge"), (kh, kw))
    return win.min(axis=(-2, -1)), win.max(axis=(-2, -1))


def _median5(a: np.ndarray) -> np.ndarray:
    if cv2 is not None:
        return cv2.medianBlur(a.astype(np.float32), 5)
    from numpy.lib.stride_tricks import sliding_window_view

    return np.median(sliding_window_view(np.pad(a, 2, mode="edge"), (5, 5)), axis=(-2, -1)).astype(np.float32)
