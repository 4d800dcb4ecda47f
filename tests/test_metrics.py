"""hardener.metrics: conventions (RGB or BT.601 Y, crop border, 8-bit rounding), scikit-image parity, and the
one path scrubber (hardener.rewrite.scrub_paths / scrub_model)."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from hardener.metrics import Conventions, luma, prepare, psnr, psnr_of_mse, squared_error, ssim
from hardener.rewrite import absolute_dirs, scrub_model, scrub_paths


def _pair(shape=(3, 40, 48), seed=0):
    rng = np.random.default_rng(seed)
    a = rng.random(shape)
    return a, np.clip(a + rng.normal(0, 0.05, shape), 0, 1)


def test_y_channel_is_bt601_luma_as_basicsr_computes_it():
    rng = np.random.default_rng(1)
    x = rng.random((3, 17, 23))
    r, g, b = x
    formula = (16 + 65.481 * r + 128.553 * g + 24.966 * b) / 255
    np.testing.assert_allclose(luma(x)[0], formula, rtol=0, atol=1e-12)
    np.testing.assert_allclose(luma(255 * x, data_range=255)[0] / 255, formula, rtol=0, atol=1e-12)  # any data range
    assert luma(x[None]).shape == (1, 1, 17, 23)  # batches too
    y = prepare(x, conventions=Conventions(channel="y", crop_border=2))
    assert y.shape == (1, 13, 19)
    np.testing.assert_allclose(y[0], formula[2:-2, 2:-2], rtol=0, atol=1e-12)
    grey = rng.random((1, 9, 9))  # not RGB: used as it is (BasicSR does the same)
    assert np.array_equal(prepare(grey, conventions=Conventions(channel="y")), grey)


def test_y_psnr_matches_the_formula_and_skimage():
    a, b = _pair()
    c = Conventions(channel="y", crop_border=4)

    def y(img):
        return ((16 + 65.481 * img[0] + 128.553 * img[1] + 24.966 * img[2]) / 255)[4:-4, 4:-4]

    expected = 10 * math.log10(1 / np.mean((y(a) - y(b)) ** 2))
    assert psnr(a, b, conventions=c) == pytest.approx(expected, abs=1e-9)
    assert ssim(a, b, conventions=c) == pytest.approx(
        structural_similarity(y(a), y(b), data_range=1.0, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False), abs=1e-12)
    assert psnr(a, b, conventions=c) != psnr(a, b, crop_border=4)  # Y differs from RGB


def test_uint8_rounding_changes_psnr_as_expected():
    levels = np.random.default_rng(2).integers(10, 240, (3, 12, 12))
    truth = levels / 255.0
    small = truth + 0.4 / 255  # rounds back to the same levels
    large = truth + 0.6 / 255  # rounds to the next level: an error of exactly 1/255
    rounded = Conventions(rounding="uint8")
    assert psnr(small, truth) == pytest.approx(20 * math.log10(255 / 0.4))
    assert psnr(small, truth, conventions=rounded) == math.inf
    assert psnr(large, truth) == pytest.approx(20 * math.log10(255 / 0.6))
    assert psnr(large, truth, conventions=rounded) == pytest.approx(20 * math.log10(255))
    # clipping comes first: 1.3 and -0.2 become 255 and 0
    assert np.array_equal(prepare(np.array([[[1.3, -0.2, 0.5]]]), conventions=rounded),
                          np.array([[[1.0, 0.0, 128 / 255]]]))
    # already 8-bit images are left exactly as they are
    assert np.array_equal(prepare(truth, conventions=rounded), truth)
    # a range of 255: rounding to whole numbers
    assert psnr(255 * large, 255 * truth, data_range=255, conventions=rounded) == pytest.approx(20 * math.log10(255))


@pytest.mark.parametrize("crop", [0, 3])
def test_scikit_image_parity(crop):
    a, b = _pair(seed=3)
    ac = a[:, crop:-crop, crop:-crop] if crop else a
    bc = b[:, crop:-crop, crop:-crop] if crop else b
    assert psnr(a, b, crop_border=crop) == peak_signal_noise_ratio(ac, bc, data_range=1.0)
    assert ssim(a, b, crop_border=crop) == structural_similarity(
        ac, bc, data_range=1.0, channel_axis=0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert psnr_of_mse(squared_error(a, b, crop_border=crop)) == pytest.approx(psnr(a, b, crop_border=crop),
                                                                              abs=1e-12)
    assert psnr(a, a) == math.inf


def test_conventions_are_checked_and_described():
    assert Conventions().describe() == "PSNR/SSIM per image then averaged, RGB, crop border 0, clipped to [0, 1]"
    assert Conventions("y", 2, "uint8").describe() == ("PSNR/SSIM per image then averaged, BT.601 Y, crop border 2, "
                                                       "outputs rounded to 8 bits, clipped to [0, 1]")
    for bad in (dict(channel="ycbcr"), dict(crop_border=-1), dict(crop_border=1.5), dict(rounding="uint16")):
        with pytest.raises(ValueError):
            Conventions(**bad)
    a, b = _pair(seed=4)
    with pytest.raises(ValueError, match="conflicts"):
        psnr(a, b, crop_border=2, conventions=Conventions(crop_border=4))
    assert psnr(a, b, crop_border=4, conventions=Conventions(crop_border=4)) == psnr(a, b, crop_border=4)
    with pytest.raises(Exception):
        Conventions().crop_border = 3  # frozen


@pytest.mark.parametrize("text, scrubbed", [
    ('File "/home/u/proj/x.py", line 3', 'File "x.py", line 3'),
    ("/home/u/dir/", ""),  # a trailing directory goes too
    ("C:\\Users\\me\\x.py", "x.py"),
    ("C:/Users/me/x.py", "x.py"),
    ("\\\\server\\share\\x.py", "x.py"),
    ("~/proj/x.py", "x.py"),
    ("see /usr/lib/python3.12/site-packages/torch/nn/conv.py:565", "see conv.py:565"),
    ("a/b/c.py", "a/b/c.py"),  # relative paths, names and arithmetic stay
    ("./a/b.py", "./a/b.py"),
    ("../a/b.py", "../a/b.py"),
    ("torch.nn/modules", "torch.nn/modules"),
    ("x = a / b / c", "x = a / b / c"),
    ("/x.py", "/x.py"),
])
def test_scrub_paths(text, scrubbed):
    assert scrub_paths(text) == scrubbed
    assert (absolute_dirs(text) == []) == (text == scrubbed)


def test_scrub_model_reaches_every_text():
    def node(name):
        n = helper.make_node("Identity", ["x"], ["y"], name=name, doc_string="at /home/u/a/x.py")
        n.metadata_props.add(key="trace", value='File "/home/u/a/x.py", line 1')
        return n

    body = helper.make_graph([node("inner")], "body", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    outer = node("outer")
    outer.attribute.append(helper.make_attribute("then_branch", body))
    graph = helper.make_graph([outer], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
                              doc_string="/opt/build/g.txt")
    model = helper.make_model(graph, doc_string="C:\\build\\m.txt")
    model.metadata_props.add(key="where", value="/srv/a/b.onnx")
    model.functions.append(helper.make_function("f", "fn", ["x"], ["y"], [node("in_fn")], []))
    assert scrub_model(model) == 3  # node metadata values changed: outer, inner (subgraph), in_fn
    text = str(model)
    assert "/home/" not in text and "/opt/" not in text and "build\\\\" not in text and "/srv/" not in text
    assert 'x.py' in text and "g.txt" in text and "m.txt" in text and "b.onnx" in text
    empty = helper.make_model(helper.make_graph([], "e", [], []))
    scrub_model(empty)
    assert not empty.HasField("doc_string") and not empty.graph.HasField("doc_string")  # no empty fields added
