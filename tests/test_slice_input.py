"""The preprocessing inside the model (``medqc.models.slice_input``) and the host geometry it runs on
(``medqc.analysis.preprocess``): OpenCV's resize as the reference, ONNX Runtime against torch, batching,
orientation, padding."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from conftest import need_module

from medqc.analysis.preprocess import (INPUT_NAMES, PreprocessParams, geometry, geometry_key, group_by_geometry,
                                       canonical_flips)

torch = need_module("torch", "the preprocessing module is torch (the train extra)")
cv2 = need_module("cv2", "OpenCV is the reference the graph's resampling is checked against")

from medqc.models.slice_input import SliceInput, as_tensors, prepare  # noqa: E402

PP = PreprocessParams()

# (rows, cols, pixel spacing, orientation): shrinking by integer and fractional factors (INTER_AREA),
# enlarging (INTER_LINEAR), one axis shrinking and the other enlarging (INTER_AREA's 2-tap mode), no
# resampling at all, crops and pads, every flip
CASES = [
    (512, 512, (0.7, 0.7), None),
    (512, 512, (0.9, 0.9), (-1, 0, 0, 0, -1, 0)),
    (512, 512, (1.0, 1.0), (1, 0, 0, 0, -1, 0)),
    (256, 256, (1.5, 1.5), (-1, 0, 0, 0, 1, 0)),
    (256, 256, (2.5, 2.5), None),
    (256, 256, (2.0, 2.0), None),
    (1024, 1024, (0.35, 0.35), None),
    (512, 400, (0.8, 1.1), None),
    (300, 512, (2.4, 1.2), (-1, 0, 0, 0, -1, 0)),
    (333, 333, (1.37, 1.37), None),
    (200, 200, (3.0, 1.5), None),
    (768, 768, (0.6, 0.6), None),
]


def opencv_reference(hu: np.ndarray, spacing, params: PreprocessParams, orientation=None) -> np.ndarray:
    """The network input computed the way the shipped network was trained on it: OpenCV's resize on the
    whole slice, then the crop or pad, windows and mask (test reference only)."""
    fr, fc = canonical_flips(orientation)
    img = hu[::-1 if fr else 1, ::-1 if fc else 1].astype(np.float32)
    inside = img >= params.pad_below_hu
    img = np.where(inside, img, np.float32(-1000.0))
    h = max(1, int(round(img.shape[0] * spacing[0] / params.pixel_mm)))
    w = max(1, int(round(img.shape[1] * spacing[1] / params.pixel_mm)))

    def resize(a):
        if a.shape == (h, w):
            return a
        interp = cv2.INTER_AREA if (h < a.shape[0] or w < a.shape[1]) else cv2.INTER_LINEAR
        return cv2.resize(np.ascontiguousarray(a), (w, h), interpolation=interp)

    img, mask = resize(img), resize(inside.astype(np.float32))
    s = params.size
    out = np.empty((params.channels, s, s), np.float32)

    def span(n):
        if n >= s:
            a = (n - s) // 2
            return slice(a, a + s), slice(0, s)
        a = (s - n) // 2
        return slice(0, n), slice(a, a + n)

    (sr, dr), (sc, dc) = span(h), span(w)
    for i, (lo, hi) in enumerate(params.windows):
        out[i].fill(-1.0)
        out[i][dr, dc] = np.clip((img[sr, sc] - lo) * (2.0 / (hi - lo)) - 1.0, -1.0, 1.0)
    out[-1].fill(0.0)
    out[-1][dr, dc] = mask[sr, sc]
    return out


def ct_like(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = rng.normal(0, 500, (rows, cols)).astype(np.float32)
    yy, xx = np.mgrid[:rows, :cols]
    hu[(yy - rows / 2) ** 2 + (xx - cols / 2) ** 2 > (min(rows, cols) / 2.2) ** 2] = -3024.0  # padding outside the field
    return hu


@pytest.mark.parametrize("rows,cols,spacing,orientation", CASES)
def test_graph_preprocessing_equals_opencv(rows, cols, spacing, orientation):
    """Area averaging (cv2.INTER_AREA) when shrinking, bilinear (cv2.INTER_LINEAR) when enlarging, the
    flips, the pad's -1 and 0, the padding's mask: equal to OpenCV to float32 rounding."""
    hu = ct_like(rows, cols, rows + cols)
    got = prepare([(hu, spacing, orientation)], PP)[0]
    want = opencv_reference(hu, spacing, PP, orientation)
    assert got.shape == want.shape == (PP.channels, PP.size, PP.size)
    assert np.abs(got - want).max() < 2e-6, np.abs(got - want).max(axis=(1, 2))


def test_onnx_graph_equals_torch_on_every_geometry(tmp_path):
    """The exported preprocessing, under ONNX Runtime with dynamic rows, columns and taps, gives what torch
    gives, on every geometry above and on batches."""
    ort = need_module("onnxruntime")
    from medqc.export.specs import ExportSpec

    spec = ExportSpec(model="pre")
    axes = {k: v for k, v in spec.dynamic_axes.items() if k in INPUT_NAMES}
    axes["image"] = {0: "batch"}
    sample = as_tensors(geometry(384, 384, (1.1, 1.1), PP).feeds(ct_like(384, 384, 0)[None].repeat(2, 0)))
    path = tmp_path / "pre.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-exporter deprecation notice, as in medqc export
        torch.onnx.export(SliceInput(PP), tuple(sample), str(path), input_names=list(INPUT_NAMES), output_names=["image"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pre = SliceInput(PP)
    for rows, cols, spacing, orientation in CASES:
        hu = np.stack([ct_like(rows, cols, k) for k in range(3)])
        feeds = geometry(rows, cols, spacing, PP, orientation).feeds(hu)
        (x,) = sess.run(None, feeds)
        with torch.inference_mode():
            ref = pre(*as_tensors(feeds)).numpy()
        assert x.shape == (3, PP.channels, PP.size, PP.size)
        assert np.abs(x - ref).max() < 1e-6, (rows, cols, spacing)
        one = sess.run(None, geometry(rows, cols, spacing, PP, orientation).feeds(hu[1]))[0]
        assert np.abs(one[0] - x[1]).max() < 1e-6  # a slice alone = the same slice in a batch


def test_preprocess_is_physical_size_invariant():
    # a 200 mm disc of water in a 500 mm FOV at 512² and in a 400 mm FOV at 256²
    def disc(n, fov):
        y, x = (np.mgrid[:n, :n] - (n - 1) / 2) * (fov / n)
        return np.where(x**2 + y**2 < 100**2, 0.0, -1000.0).astype(np.float32), (fov / n, fov / n), None

    a, b = prepare([disc(512, 500.0), disc(256, 400.0)], PP)
    area_a = (a[0] > -0.5).sum() * PP.pixel_mm**2
    area_b = (b[0] > -0.5).sum() * PP.pixel_mm**2
    assert abs(area_a - np.pi * 100**2) / (np.pi * 100**2) < 0.05
    assert abs(area_a - area_b) / area_a < 0.05


def test_padding_is_outside_the_field_and_the_pad_is_empty():
    hu = np.full((512, 512), -3024.0, np.float32)  # GE-style outside-circle padding
    yy, xx = np.mgrid[:512, :512] - 255.5
    hu[xx**2 + yy**2 < 250**2] = 40.0
    x = prepare([(hu, (0.9, 0.9), None)], PP)[0]
    assert x[-1].max() == pytest.approx(1.0) and x[-1].min() == 0.0
    assert x[0].min() >= -1.0 and x[0].max() <= 1.0
    assert x[-1][128, 128] == 1.0 and x[-1][0, 0] == 0.0 and x[1][0, 0] == -1.0  # padding reads as air, outside the mask
    small = prepare([(np.zeros((128, 128), np.float32), (1.0, 1.0), None)], PP)[0]  # 64² of tissue in a 256² input
    assert (small[:3, :96] == -1.0).all() and (small[-1, :96] == 0.0).all() and (small[-1, 96:160, 96:160] == 1.0).all()
    with pytest.raises(ValueError, match="spacing"):
        geometry(512, 512, (0.0, 0.9), PP)


def test_preprocess_mirrors_slices_into_the_training_layout():
    """A slice stored with rows running posterior→anterior (prone habit, flipped archives) and/or columns
    running left→right reaches the network as a supine head-first slice would: the same array."""
    rng = np.random.default_rng(3)
    hu = np.full((256, 256), -1000.0, np.float32)
    hu[40:150, 60:220] = 40.0  # an asymmetric body: more tissue anterior and to the patient's left
    hu[150:200, 60:120] = 300.0
    hu += rng.normal(0, 5, hu.shape).astype(np.float32)
    pp = PreprocessParams(size=128)
    ref = prepare([(hu, (1.0, 1.0), (1, 0, 0, 0, 1, 0))], pp)[0]
    assert np.array_equal(ref, prepare([(hu, (1.0, 1.0), None)], pp)[0])  # no orientation given: stored layout
    for iop, stored in (((1, 0, 0, 0, -1, 0), hu[::-1]), ((-1, 0, 0, 0, 1, 0), hu[:, ::-1]),
                        ((-1, 0, 0, 0, -1, 0), hu[::-1, ::-1])):
        stored = np.ascontiguousarray(stored)
        assert np.array_equal(prepare([(stored, (1.0, 1.0), iop)], pp)[0], ref), iop
        assert not np.array_equal(prepare([(stored, (1.0, 1.0), None)], pp)[0], ref)
    # tilted gantry (column direction 0, cos t, sin t) is still the training layout; a rotated in-plane
    # frame (x and y swapped) or a non-axial slice is left as stored
    for iop in ((1, 0, 0, 0, 0.966, 0.259), (0, 1, 0, -1, 0, 0), (1, 0, 0, 0, 0, -1)):
        assert np.array_equal(prepare([(hu, (1.0, 1.0), iop)], pp)[0], ref)


def test_geometry_is_computed_once_and_groups_follow_it():
    a = geometry(512, 512, (0.7, 0.7), PP, (1, 0, 0, 0, 1, 0))
    assert geometry(512, 512, (0.7, 0.7), PP, None) is a  # the same flips: the same cached arrays
    assert not a.row_index.flags.writeable
    assert a.row_index.shape == (PP.size, a.row_weight.shape[1]) and a.row_valid.shape == (PP.size,)
    np.testing.assert_allclose(a.row_weight.sum(1)[a.row_valid > 0], 1.0, atol=1e-6)  # area weights sum to 1
    slices = [((512, 512), (0.7, 0.7), None), ((512, 512), (0.8, 0.8), None), ((512, 512), (0.7, 0.7), (1, 0, 0, 0, 1, 0)),
              ((512, 512), (0.7, 0.7), (-1, 0, 0, 0, 1, 0)), ((256, 256), (0.7, 0.7), None)]
    groups = group_by_geometry(slices, PP)
    assert [idx for _, idx in groups] == [[0, 2], [1], [3], [4]]
    assert geometry_key(*slices[0]) == geometry_key(*slices[2]) != geometry_key(*slices[3])


def test_training_cache_is_made_by_the_same_module_in_worker_processes(tmp_path):
    """``medqc train``'s cache: worker processes generate the slices (started from a fork server: forked
    from this process, whose torch threads are up, they hung) and the parent preprocesses them with the
    module the exported graph carries; the cached float16 input is that module's output."""
    need_module("medqc.synth.training")
    from medqc.models.data import CHUNK, build_cache, chunk_seed
    from medqc.synth.training import sample_training_slices

    prepare([(np.zeros((64, 64), np.float32), (1.0, 1.0), None)], PP)  # torch's threads are up in the parent
    n = CHUNK + 2
    cache = build_cache(tmp_path / "c", n, 3, PP, workers=2, progress=False)
    assert cache.x.shape == (n, PP.channels, PP.size, PP.size)
    tail = sample_training_slices(2, chunk_seed(3, 1))
    want = prepare([(ts.hu, ts.pixel_spacing, None) for ts in tail], PP).astype(np.float16)
    assert np.array_equal(np.asarray(cache.x[CHUNK:]), want)
