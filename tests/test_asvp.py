"""The ONNX ASVP subgraph against the float64 torch.linalg.svd reference, and its numerical safety."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from hardener.asvp import AsvpParams, standalone_model
from hardener.reference import asvp_reference, relative_error, spectral_gap

from conftest import run_model

GAP = 0.8
TOL = 1e-4


def asvp_onnx(x: np.ndarray, params: AsvpParams, opset: int = 18, elem_type=TensorProto.FLOAT) -> np.ndarray:
    model = standalone_model(params, opset=opset, elem_type=elem_type)
    onnx.checker.check_model(model, full_check=True)
    return run_model(model, {"x": x})[0]


def per_matrix_errors(y, x, params):
    """Relative error per matrix (per sample in channel mode, per sample and channel in spatial mode)."""
    ref = asvp_reference(x, params)
    gap = spectral_gap(ref.singular_values, params.rank)
    errors = np.zeros(gap.shape)
    for idx in np.ndindex(gap.shape):
        errors[idx] = relative_error(y[idx], ref.output[idx], x[idx])
    return errors, gap


@pytest.mark.parametrize("mode,rank", [("channel", 1), ("channel", 2), ("channel", 4),
                                       ("spatial", 1), ("spatial", 2), ("spatial", 4), ("spatial", 8)])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_matches_svd_reference_on_real_features(teacher_features, mode, rank, precision):
    params = AsvpParams(rank=rank, gain=2.0, mode=mode, precision=precision)
    checked = 0
    for name, x in teacher_features.items():
        errors, gap = per_matrix_errors(asvp_onnx(x, params), x, params)
        ok = gap <= GAP
        checked += int(ok.sum())
        assert np.all(errors[ok] <= TOL), (name, errors[ok].max(), gap[ok])
    assert checked > 0, "no matrix with a usable spectral gap: the test would check nothing"


def test_real_features_have_structure(teacher_features):
    """The check above is meaningful only if real features have a decaying spectrum (not noise)."""
    x = next(iter(teacher_features.values()))
    s = asvp_reference(x, AsvpParams(rank=1)).singular_values
    assert np.all(s[:, 0] > 3 * s[:, 4])


@pytest.mark.parametrize("energy", [0.3, 0.6, 0.7])
def test_adaptive_rank_matches_reference(teacher_features, energy):
    """Per matrix, k' is the smallest rank whose energy reaches p; compared where p is not on a knife edge."""
    params = AsvpParams(rank=4, gain=1.5, adaptive_energy=energy)
    x = teacher_features["body.1.conv2"]
    ref = asvp_reference(x, params)
    y = asvp_onnx(x, params)
    s2 = ref.singular_values**2
    cumulative = np.cumsum(s2, -1) / s2.sum(-1, keepdims=True)
    clear = np.all(np.abs(cumulative[:, :4] - energy) > 1e-3, axis=-1)  # no cut within 0.1 % of p
    gaps = np.array([spectral_gap(ref.singular_values[n], int(k)) for n, k in enumerate(ref.ranks)])
    clear &= gaps <= GAP  # and the subspace of the chosen k' is well defined
    assert clear.sum() >= 1
    for n in np.flatnonzero(clear):
        assert relative_error(y[n], ref.output[n], x[n]) <= TOL
    if energy == 0.3:
        assert ref.ranks.max() < 4  # the adaptive mask really removed columns


@pytest.mark.parametrize("scale", [1e-15, 1e-10, 1.0, 1e10, 1e15])
@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_any_realistic_scale_is_perturbed_exactly(teacher_features, scale, mode):
    """The Gram matrix is unscaled float32: exact from about 1e-17 to 1e17 (floating point is scale-free)."""
    params = AsvpParams(rank=1, gain=2.0, mode=mode)
    base = teacher_features["body.0.conv2"][:1]
    x = (base.astype(np.float64) * scale).astype(np.float32)
    y = asvp_onnx(x, params)
    assert np.all(np.isfinite(y))
    assert not np.allclose(y, x, rtol=1e-3, atol=0), "silent no-op"
    errors, gap = per_matrix_errors(y, x, params)
    ok = gap <= GAP
    assert ok.any() and errors[ok].max() <= 1e-3


@pytest.mark.parametrize("scale", [1e-30, 1e25, 1e30, 1e36])
@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_out_of_range_scales_pass_through_unchanged(teacher_features, scale, mode):
    """Where the float32 Gram matrix under- or overflows, the map comes back bit-identical: never NaN/inf,
    never a perturbation computed from garbage (validation reports such a layer as unperturbed)."""
    base = teacher_features["body.0.conv2"][:1]
    x = (base.astype(np.float64) * scale).astype(np.float32)
    y = asvp_onnx(x, AsvpParams(rank=2, gain=2.0, mode=mode))
    assert np.array_equal(y, x)


def test_all_zero_map_is_unchanged():
    x = np.zeros((2, 8, 5, 7), np.float32)
    for mode in ("channel", "spatial"):
        y = asvp_onnx(x, AsvpParams(rank=4, mode=mode))
        assert np.array_equal(y, x)


def test_rank_deficient_map_amplifies_only_existing_directions():
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(1, 16, 2)), rng.normal(size=(1, 2, 64))
    x = (u @ v).reshape(1, 16, 8, 8).astype(np.float32)  # rank 2, k = 4
    params = AsvpParams(rank=4, gain=3.0)
    y = asvp_onnx(x, params)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, 3.0 * x, rtol=1e-4, atol=1e-5 * np.abs(x).max())


def test_gain_one_is_identity(teacher_features):
    x = teacher_features["body.2.conv2"]
    y = asvp_onnx(x, AsvpParams(rank=4, gain=1.0))
    np.testing.assert_allclose(y, x, rtol=0, atol=1e-6 * np.abs(x).max())


def test_fp16_maps_are_computed_in_fp32(teacher_features):
    params = AsvpParams(rank=2, gain=1.5)
    x = teacher_features["body.1.conv2"][:2].astype(np.float16)
    model = standalone_model(params, elem_type=TensorProto.FLOAT16)
    assert any(n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT for n in model.graph.node)
    y = run_model(model, {"x": x})[0]
    assert y.dtype == np.float16 and np.all(np.isfinite(y))
    ref = asvp_reference(x.astype(np.float32), params).output
    assert relative_error(y.astype(np.float64), ref, x.astype(np.float64)) < 5e-3


@pytest.mark.parametrize("opset", [13, 17, 18, 21])
def test_every_supported_opset_builds_the_same_function(teacher_features, opset):
    x = teacher_features["body.0.conv2"][:1]
    params = AsvpParams(rank=2, gain=2.0)
    np.testing.assert_allclose(asvp_onnx(x, params, opset=opset), asvp_onnx(x, params, opset=18),
                               rtol=1e-6, atol=1e-6 * np.abs(x).max())


def test_start_block_is_seeded():
    a = standalone_model(AsvpParams(seed=1)).SerializeToString()
    assert a == standalone_model(AsvpParams(seed=1)).SerializeToString()
    assert a != standalone_model(AsvpParams(seed=2)).SerializeToString()


def test_one_by_one_and_single_channel_maps():
    rng = np.random.default_rng(1)
    for shape in [(2, 8, 1, 1), (2, 1, 6, 5), (1, 1, 1, 1)]:
        x = rng.normal(size=shape).astype(np.float32)
        for mode in ("channel", "spatial"):
            params = AsvpParams(rank=2, gain=2.0, mode=mode)
            y = asvp_onnx(x, params)
            assert np.all(np.isfinite(y))
            errors, gap = per_matrix_errors(y, x, params)
            assert np.all(errors[gap <= GAP] <= TOL), (shape, mode, errors, gap)


def test_default_schedule_and_node_budget():
    """The automatic schedule (float64, G^4, 8 iterations for k <= 4) and what it costs in nodes: the
    CPU/CUDA overhead is mostly per node, so this guards the benchmark's numbers structurally."""
    p = AsvpParams().resolved()
    assert (p.precision, p.squarings, p.iterations) == ("float64", 2, 8)
    p = AsvpParams(mode="spatial").resolved()  # H x H squarings would cost more than they save
    assert (p.precision, p.squarings, p.iterations) == ("float32", 0, 32)
    assert AsvpParams(mode="spatial", precision="float64").resolved().squarings == 0
    assert AsvpParams(rank=8).resolved().squarings == 1 and AsvpParams(rank=8).resolved().iterations == 16
    assert AsvpParams(precision="float32").resolved().squarings == 0
    assert AsvpParams(precision="float32").resolved().iterations == 32
    assert AsvpParams(iterations=5, squarings=1).resolved().iterations == 5
    nodes = {k: len(standalone_model(AsvpParams(rank=k)).graph.node) for k in (1, 2, 4)}
    assert nodes[1] < 80 and nodes[2] < 160 and nodes[4] < 300, nodes
    assert len(standalone_model(AsvpParams(precision="float32")).graph.node) > 3 * nodes[4] // 2


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_both_channel_reconstructions_match_reference(teacher_features, rank):
    """Channel mode applies (I + (h-1) QQ^T) M as one product when C <= DENSE_MAX_CHANNELS is static, else the
    low-rank form: both agree with the SVD reference (and with each other), and the choice is visible."""
    from hardener.asvp import DENSE_MAX_CHANNELS

    params = AsvpParams(rank=rank, gain=2.0)
    x = teacher_features["body.2.conv2"]
    c = x.shape[1]
    assert c <= DENSE_MAX_CHANNELS
    dense = standalone_model(params, shape=["N", c, "H", "W"])
    lowrank = standalone_model(params, shape=["N", "C", "H", "W"])
    assert "Equal" in {n.op_type for n in dense.graph.node}  # the identity for I + (h-1) QQ^T
    assert "Equal" not in {n.op_type for n in lowrank.graph.node}
    y_dense, y_low = run_model(dense, {"x": x})[0], run_model(lowrank, {"x": x})[0]
    for y in (y_dense, y_low):
        errors, gap = per_matrix_errors(y, x, params)
        ok = gap <= GAP
        assert np.all(errors[ok] <= TOL)
    assert relative_error(y_dense, y_low.astype(np.float64), x) < 1e-5


def _last_compute_node(model: onnx.ModelProto) -> onnx.NodeProto:
    return [n for n in model.graph.node if n.op_type not in ("Identity", "Cast")][-1]


@pytest.mark.parametrize("channels,expected", [(64, True), (16, True), (12, False), (None, False)])
def test_static_channels_end_with_an_identity_depthwise_conv(channels, expected):
    """For static C divisible by LAYOUT_CHANNEL_MULTIPLE the subgraph's last node is a depthwise 1x1 Conv with
    weights 1 and no bias (exact), which keeps ONNX Runtime's CPU NCHWc chain intact; otherwise no Conv."""
    from onnx import numpy_helper

    from hardener.asvp import LAYOUT_CHANNEL_MULTIPLE

    for mode in ("channel", "spatial"):
        model = standalone_model(AsvpParams(rank=2, mode=mode), shape=["N", channels or "C", "H", "W"])
        last = _last_compute_node(model)
        assert (last.op_type == "Conv") == expected, (channels, mode, last.op_type)
        assert sum(n.op_type == "Conv" for n in model.graph.node) == int(expected)
        if expected:
            assert channels % LAYOUT_CHANNEL_MULTIPLE == 0 and len(last.input) == 2  # no bias
            weight = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == last.input[1]))
            assert weight.shape == (channels, 1, 1, 1) and np.all(weight == 1.0)
            assert onnx.helper.get_attribute_value(next(a for a in last.attribute if a.name == "group")) == channels


@pytest.mark.parametrize("mode,rank", [("channel", 1), ("channel", 4), ("spatial", 2)])
def test_sixty_four_static_channels_match_reference(teacher_features, mode, rank):
    """C = 64 static (the low-rank update, then the identity conv) on real maps: two layers' features side by
    side, against the SVD reference, and equal to the dynamic-C subgraph (no identity conv) to round-off."""
    params = AsvpParams(rank=rank, gain=2.0, mode=mode)
    static = standalone_model(params, shape=["N", 64, "H", "W"])
    onnx.checker.check_model(static, full_check=True)
    checked = 0
    for a, b in [(0, 2), (1, 2), (2, 3)]:  # pairs that give k = 4 matrices with a usable gap
        x = np.concatenate([teacher_features[f"body.{a}.conv2"], teacher_features[f"body.{b}.conv2"]], axis=1)
        assert x.shape[1] == 64
        y = run_model(static, {"x": x})[0]
        errors, gap = per_matrix_errors(y, x, params)
        ok = gap <= GAP
        checked += int(ok.sum())
        assert np.all(errors[ok] <= TOL), (a, b, errors[ok].max(), gap[ok])
        np.testing.assert_allclose(y, asvp_onnx(x, params), rtol=0, atol=1e-6 * np.abs(x).max())
    assert checked > 0


def _residual_net(channels: int, blocks: int) -> onnx.ModelProto:
    """x -> head conv -> `blocks` residual blocks (conv, relu, conv, + skip) -> tail conv, dynamic H, W."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def conv(src, cin, cout, name):
        w = numpy_helper.from_array((rng.normal(size=(cout, cin, 3, 3)) * 0.1).astype(np.float32), name + "_w")
        inits.append(w)
        nodes.append(helper.make_node("Conv", [src, w.name], [name], pads=[1, 1, 1, 1], name=name))
        return name

    f = conv("x", 3, channels, "head")
    for i in range(blocks):
        r = helper.make_node("Relu", [conv(f, channels, channels, f"b{i}_c1")], [f"b{i}_r"], name=f"b{i}_relu")
        nodes.append(r)
        c2 = conv(f"b{i}_r", channels, channels, f"b{i}_c2")
        nodes.append(helper.make_node("Add", [f, c2], [f"b{i}_out"], name=f"b{i}_add"))
        f = f"b{i}_out"
    tail = conv(f, channels, 3, "tail")
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])],
                              [helper.make_tensor_value_info(tail, TensorProto.FLOAT, [1, 3, "H", "W"])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def _hardened_at(model: onnx.ModelProto, tensor: str, params: AsvpParams, channels) -> onnx.ModelProto:
    """``model`` with ASVP on ``tensor`` (its producer renamed, as rewrite.py does), built by build_asvp."""
    from hardener.asvp import GraphBuilder, build_asvp

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    idx = next(i for i, n in enumerate(graph.node) if tensor in n.output)
    graph.node[idx].output[0] = tensor + "/pre"
    builder = GraphBuilder(opset=18, prefix="asvp", taken={n.name for n in graph.node} | {tensor, tensor + "/pre"})
    build_asvp(builder, tensor + "/pre", tensor, params, TensorProto.FLOAT, channels=channels)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes[:idx + 1] + builder.nodes + nodes[idx + 1:])
    graph.initializer.extend(builder.initializers)
    return out


def _optimized_ops(model: onnx.ModelProto, tmp_path, name: str) -> list[str]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def test_onnxruntime_cpu_keeps_the_blocked_layout_after_an_insertion(tmp_path):
    """Inserted early in a residual chain, the subgraph costs ONNX Runtime's CPU NCHWc layout one reorder out
    (the Gram matrix reads plain NCHW) and one in (the identity conv), not a reorder pair per later block."""
    net = _residual_net(16, 4)
    ops = _optimized_ops(net, tmp_path, "original")
    if "ReorderInput" not in ops and "ReorderOutput" not in ops:
        pytest.skip("this onnxruntime build/CPU does not use the NCHWc layout")
    params = AsvpParams(rank=2)
    for mode in ("channel", "spatial"):
        hardened = _hardened_at(net, "b0_c2", replace_mode(params, mode), channels=16)
        hops = _optimized_ops(hardened, tmp_path, mode)
        assert hops.count("ReorderOutput") <= ops.count("ReorderOutput") + 1, (mode, hops)
        assert hops.count("ReorderInput") <= ops.count("ReorderInput") + 1, (mode, hops)
        x = real_photos_like()
        y, y_ref = run_model(hardened, {"x": x})[0], run_model(_hardened_at(net, "b0_c2", replace_mode(params, mode),
                                                                              channels=None), {"x": x})[0]
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())
    # without the identity conv (dynamic C) the chain breaks: every later block reorders out and back in
    broken = _optimized_ops(_hardened_at(net, "b0_c2", params, channels=None), tmp_path, "dynamic")
    assert broken.count("ReorderInput") >= ops.count("ReorderInput") + 3


def replace_mode(params: AsvpParams, mode: str) -> AsvpParams:
    from dataclasses import replace

    return replace(params, mode=mode)


def real_photos_like() -> np.ndarray:
    from conftest import real_photos

    return real_photos(size=32, count=1)
