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
