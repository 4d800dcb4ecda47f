"""Stripping inserted subgraphs (hardener.strip): by manifest, by node names, and by structure alone."""
from __future__ import annotations

import random

import numpy as np
import onnx
import pytest

from hardener.asvp import AsvpParams
from hardener.layers import LayerIndex
from hardener.rewrite import MANIFEST_KEY, insert_asvp
from hardener.strip import FINDERS, strip_asvp

from conftest import TEACHER as TEACHER_PATH, run_model

CASES = {  # placement, mode: selectors covering a graph input, a graph output, Conv->Relu and Conv->Add
    ("inline", "channel"): ["body.*.conv2", "tensor:lr", "tensor:sr"],
    ("inline", "spatial"): ["body.0.conv1", "body.0.conv2", "body.0"],
    ("tap", "channel"): ["body.*.conv2", "body.0.conv1", "tensor:lr", "tensor:sr"],
    ("tap", "spatial"): ["body.1.conv2"],
}


@pytest.fixture(scope="module")
def probe():
    return np.random.default_rng(0).random((2, 3, 20, 24), dtype=np.float32)


def harden_teacher(teacher, placement, mode, params=None):
    selections = LayerIndex(teacher).select(CASES[(placement, mode)])
    return insert_asvp(teacher, 18, selections, params or AsvpParams(rank=2, mode=mode), placement, "sha",
                       scrub=False)


def randomised(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """What a thief may ship: no manifest, every node and internal tensor renamed at random."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.metadata_props[:]
    rng = random.Random(seed)
    pool = list(range(10**6))
    rng.shuffle(pool)
    ids = iter(pool)
    interface = {v.name for v in list(out.graph.input) + list(out.graph.output)}
    renames = {t.name: f"w{next(ids)}" for t in out.graph.initializer}
    for node in out.graph.node:
        node.name = f"n{next(ids)}"
        del node.metadata_props[:]
        renames.update((o, f"v{next(ids)}") for o in node.output if o not in interface)
    for t in out.graph.initializer:
        t.name = renames[t.name]
    for node in out.graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
        node.output[:] = [renames.get(o, o) for o in node.output]
    del out.graph.value_info[:]
    return out


@pytest.mark.parametrize("by", FINDERS)
@pytest.mark.parametrize("placement,mode", list(CASES))
def test_strip_restores_the_original_bytes(teacher, probe, placement, mode, by):
    hardened, insertions = harden_teacher(teacher, placement, mode)
    before = hardened.SerializeToString(deterministic=True)
    stripped, removed = strip_asvp(hardened, by=by)
    assert removed == len(insertions)
    assert hardened.SerializeToString(deterministic=True) == before  # the input is never modified
    # Names, node metadata, value_info, initializers, outputs: everything is back as it was.
    assert stripped.SerializeToString(deterministic=True) == teacher.SerializeToString(deterministic=True)
    np.testing.assert_array_equal(run_model(stripped, {"lr": probe})[0], run_model(teacher, {"lr": probe})[0])


@pytest.mark.parametrize("placement,mode", list(CASES))
def test_structure_finds_subgraphs_without_manifest_or_names(teacher, probe, placement, mode):
    hardened, insertions = harden_teacher(teacher, placement, mode)
    thief = randomised(hardened)
    assert not any(n.name.startswith("hardener") for n in thief.graph.node)
    assert strip_asvp(thief)[1] == 0  # the name-based finders are blind here
    stripped, removed = strip_asvp(thief, by="structure")
    assert removed == len(insertions)
    onnx.checker.check_model(stripped, full_check=True)
    assert [n.op_type for n in stripped.graph.node] == [n.op_type for n in teacher.graph.node]
    assert [o.name for o in stripped.graph.output] == [o.name for o in teacher.graph.output]
    assert len(stripped.graph.initializer) == len(teacher.graph.initializer)
    np.testing.assert_array_equal(run_model(stripped, {"lr": probe})[0], run_model(teacher, {"lr": probe})[0])


def test_structure_handles_adaptive_rank_and_float32_iterations(teacher, probe):
    params = AsvpParams(rank=3, mode="channel", adaptive_energy=0.9, precision="float32")
    hardened, insertions = harden_teacher(teacher, "inline", "spatial", params)
    stripped, removed = strip_asvp(randomised(hardened, seed=1), by="structure")
    assert removed == len(insertions)
    np.testing.assert_array_equal(run_model(stripped, {"lr": probe})[0], run_model(teacher, {"lr": probe})[0])


def test_structure_finds_nothing_in_unhardened_models(teacher, dynamo_model):
    for model in (teacher, onnx.load(str(dynamo_model))):
        stripped, removed = strip_asvp(model, by="structure")
        assert removed == 0
        assert stripped.SerializeToString(deterministic=True) == model.SerializeToString(deterministic=True)


def test_stacked_and_repeated_hardening_strip_cleanly(teacher, probe):
    once, first = harden_teacher(teacher, "inline", "channel")
    again = onnx.ModelProto()
    again.CopyFrom(once)
    del again.metadata_props[:]  # a hardened file whose manifest was removed can be hardened again
    layer = LayerIndex(teacher).select(["body.1.conv2"])[0]
    twice, second = insert_asvp(again, 18, [layer, layer], AsvpParams(rank=1), "inline", "sha", scrub=False)
    assert {i.prefix for i in first}.isdisjoint(i.prefix for i in second)  # fresh prefixes, one group each
    names = [n.name for n in twice.graph.node]
    assert len(names) == len(set(names))
    for by in ("names", "structure"):
        stripped, removed = strip_asvp(twice, by=by)
        assert removed == len(first) + 2, by
        assert stripped.SerializeToString(deterministic=True) == teacher.SerializeToString(deterministic=True)
    assert not np.array_equal(run_model(twice, {"lr": probe})[0], run_model(once, {"lr": probe})[0])


def test_manifest_limits_what_is_stripped(teacher):
    hardened, insertions = harden_teacher(teacher, "inline", "channel")
    assert any(p.key == MANIFEST_KEY for p in hardened.metadata_props)
    stripped, removed = strip_asvp(hardened)  # default: by manifest
    assert removed == len(insertions)
    assert not any(p.key == MANIFEST_KEY for p in stripped.metadata_props)


def test_attacks_reexport():
    from attacks import oracle
    from hardener import strip

    assert oracle.strip_asvp is strip.strip_asvp


def test_no_manifest_file_hides_labels_and_only_structure_strips_it(tmp_path, teacher, probe):
    """`harden --no-manifest`: no manifest, no rewrite-made name; it validates, and structure still strips it."""
    from hardener import HardenConfig, harden

    out = tmp_path / "anon.onnx"
    result = harden(TEACHER_PATH, out, HardenConfig(layers=["body.*.conv2"], params=AsvpParams(gain=1.5),
                                                    manifest=False))
    assert result.report["status"] == "PASSED"
    assert [l["check"] for l in result.report["validation"]["layers"]] == ["ok"] * 4
    model = onnx.load(str(out))
    assert MANIFEST_KEY not in {p.key for p in model.metadata_props}
    names = {n.name for n in model.graph.node} | {t for n in model.graph.node for t in n.output}
    assert not [n for n in names if "asvp" in n.lower() or "hardener" in n.lower()]
    again = tmp_path / "again.onnx"
    harden(TEACHER_PATH, again, HardenConfig(layers=["body.*.conv2"], params=AsvpParams(gain=1.5), manifest=False))
    assert out.read_bytes() == again.read_bytes()  # opaque, yet deterministic
    assert strip_asvp(model)[1] == 0  # neither manifest nor names give it away
    stripped, removed = strip_asvp(model, by="structure")
    assert removed == 4
    np.testing.assert_array_equal(run_model(stripped, {"lr": probe})[0], run_model(teacher, {"lr": probe})[0])


def test_blind_strip_attacker_recovers_the_teacher(tmp_path, teacher, probe):
    from attacks.distill import ATTACKERS
    from attacks.suite import Defence, Runner, Suite

    defence = Defence("asvp", layers=["body.*.conv2"], gain=2.0)
    runner = Runner(Suite(defences=[Defence("none"), defence], attackers=["naive", "strip_blind"], students=["tiny"]),
                    tmp_path, progress=False)
    attacker = ATTACKERS["strip_blind"]
    path = runner.teacher_path("sr2", defence, strip=attacker.strip, strip_by=attacker.strip_by)
    served = runner.teacher_path("sr2", defence)
    assert path != served and attacker.strip_by == "structure"
    np.testing.assert_array_equal(run_model(path, {"lr": probe})[0], run_model(teacher, {"lr": probe})[0])
    assert not np.array_equal(run_model(served, {"lr": probe})[0], run_model(teacher, {"lr": probe})[0])
