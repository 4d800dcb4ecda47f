"""`harden layers` and `harden inspect`: what a model holds, its hardening and what that costs."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hardener import AsvpParams, HardenConfig, harden
from hardener.layers import LayerIndex
from hardener.rewrite import MANIFEST_KEY, NODE_PREFIX

from conftest import TEACHER, invoke

# The bundled teacher by hand: head 3->32, eight 32->32 body convs, tail 32->12, all 3x3, per output pixel.
TEACHER_MACS_PER_PIXEL = 32 * 3 * 9 + 8 * 32 * 32 * 9 + 12 * 32 * 9




@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    out = tmp_path_factory.mktemp("hardened") / "sr_x2.hardened.onnx"
    harden(TEACHER, out, HardenConfig(layers=["body.*.conv2"], params=AsvpParams(gain=1.3), validate=False))
    return out


def test_layers_marks_interface_and_suggests_body_convs(capsys, monkeypatch):
    code, out, err = invoke(capsys, monkeypatch, "layers", TEACHER)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["module", "node", "op", "tensor", "shape", "dtype", "note"]
    row = {line.split()[0] if not line.startswith("(") else "input": line for line in lines[1:]}
    assert row["input"].rstrip().endswith("graph input")
    assert next(l for l in lines if " sr " in l).rstrip().endswith("graph output")
    suggested = [l.split()[0] for l in lines[1:] if l.rstrip().endswith("suggested")]
    assert suggested == [f"body.{i}.conv2" for i in range(4)]  # not head/tail, not conv1 (feeds a ReLU)
    assert "suggested: --layers body.0.conv2 --layers body.1.conv2" in out
    assert lines[-1].startswith("23 feature maps, 4 suggested")

    code, out, _ = invoke(capsys, monkeypatch, "layers", TEACHER, "--json")
    doc = json.loads(out)
    assert doc["schema"] == "hardener.layers/1" and doc["hardened"] is False
    assert doc["suggested"] == [f"body.{i}.conv2" for i in range(4)]
    by_tensor = {r["tensor"]: r for r in doc["layers"]}
    assert by_tensor["lr"]["graph_input"] and by_tensor["sr"]["graph_output"]
    assert by_tensor["lr"]["selector"] == "tensor:lr" and by_tensor["lr"]["shape"] == ["batch", 3, "height", "width"]
    # every row's selector selects exactly that row's tensor
    index = LayerIndex(onnx.load(str(TEACHER)))
    for r in doc["layers"]:
        assert [l.tensor for _, l in index.select([r["selector"]])] == [r["tensor"]], r["selector"]


def _chain(activation: str | None) -> onnx.ModelProto:
    """x -> conv0 -> act -> conv1 -> act -> conv2 -> y, no module paths."""
    nodes, inits, prev = [], [], "x"
    for i in range(3):
        inits.append(numpy_helper.from_array(np.full((4, 4, 3, 3), 0.01, np.float32), f"w{i}"))
        out = "y" if i == 2 else f"c{i}"
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [out], name=f"conv{i}", pads=[1, 1, 1, 1]))
        prev = out
        if activation and i < 2:
            nodes.append(helper.make_node(activation, [out], [f"a{i}"], name=f"act{i}"))
            prev = f"a{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_suggestion_falls_back_to_body_convs_and_tensor_selectors(capsys, monkeypatch, tmp_path):
    path = tmp_path / "chain.onnx"
    onnx.save(_chain("LeakyRelu"), str(path))  # every conv feeds an activation
    code, out, _ = invoke(capsys, monkeypatch, "layers", path, "--json")
    assert code == 0
    assert json.loads(out)["suggested"] == ["tensor:c1"]  # only the middle conv: not first, not last
    onnx.save(_chain(None), str(path))
    code, out, _ = invoke(capsys, monkeypatch, "layers", path, "--json")
    assert json.loads(out)["suggested"] == ["tensor:c1"]


def test_inspect_unhardened_says_so_with_the_models_cost(capsys, monkeypatch):
    code, out, err = invoke(capsys, monkeypatch, "inspect", TEACHER)
    assert code == 0, err
    assert "not hardened" in out and out.splitlines()[-1].startswith("NOT HARDENED")
    assert "assumed for dynamic dimensions" in out and "256" in out
    code, out, _ = invoke(capsys, monkeypatch, "inspect", TEACHER, "--json")
    doc = json.loads(out)
    assert doc["hardened"] is False and doc["manifest"] is None and doc["insertions"] == []
    assert doc["cost_basis"]["model_macs"] == 256 * 256 * TEACHER_MACS_PER_PIXEL
    assert doc["cost_basis"]["inputs"] == [{"name": "lr", "shape": [1, 3, 256, 256]}]
    code, out, _ = invoke(capsys, monkeypatch, "inspect", TEACHER, "--json", "--size", "64x32")
    assert json.loads(out)["cost_basis"]["model_macs"] == 64 * 32 * TEACHER_MACS_PER_PIXEL


def test_inspect_hardened_copy(capsys, monkeypatch, hardened):
    code, out, err = invoke(capsys, monkeypatch, "inspect", hardened, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["hardened"] is True and doc["status"] == "hardened" and not doc["problems"]
    assert doc["manifest"]["params"]["gain"] == 1.3
    assert [e["label"] for e in doc["insertions"]] == [f"body.{i}.conv2" for i in range(4)]
    # the model's own work is the original's: the inserted MatMuls are counted apart
    assert doc["cost_basis"]["model_macs"] == 256 * 256 * TEACHER_MACS_PER_PIXEL
    c, hw, k = 32, 256 * 256, 4
    for e in doc["insertions"]:
        assert e["present"] and e["nodes_found"] == e["nodes_in_manifest"] > 100
        assert e["shape_at_size"] == [1, 32, 256, 256]
        est = e["estimated_macs"]
        assert est["gram"] == c * c * hw and est["form"] == "dense"  # C = 32: (I + (h-1)QQ^T) M
        assert est["update"] == c * c * hw + c * c * k
        # the estimate agrees with the multiply-adds actually inserted (shapes inferred from the graph)
        assert est["total"] == e["counted_macs"]
        assert e["fraction_of_model"] == pytest.approx(est["total"] / (hw * TEACHER_MACS_PER_PIXEL))
    assert doc["cost"]["fraction_of_model"] == pytest.approx(sum(e["fraction_of_model"] for e in doc["insertions"]))

    code, out, _ = invoke(capsys, monkeypatch, "inspect", hardened)
    assert code == 0
    assert "hardened by hardener" in out and "k=4, h=1.3" in out
    assert out.count("+ body.") == 4 and "% of the model" in out
    assert out.splitlines()[-1].startswith("HARDENED | 4 insertion(s), +")


def test_inspect_spatial_mode_cost(tmp_path, capsys, monkeypatch):
    out = tmp_path / "spatial.onnx"
    harden(TEACHER, out, HardenConfig(layers=["body.1.conv2"], params=AsvpParams(gain=1.3, mode="spatial", rank=2),
                                      validate=False))
    code, text, _ = invoke(capsys, monkeypatch, "inspect", out, "--json", "--size", "64x64")
    e = json.loads(text)["insertions"][0]
    assert e["estimated_macs"]["gram"] == 32 * 64 * 64 * 64  # per channel H*H*W
    assert e["estimated_macs"]["update"] == 32 * 2 * 2 * 64 * 64  # per channel 2*k*H*W
    assert e["estimated_macs"]["total"] == e["counted_macs"]


def test_inspect_manifest_without_nodes_and_nodes_without_manifest(capsys, monkeypatch, hardened, tmp_path):
    model = onnx.load(str(hardened))
    stripped = onnx.load(str(TEACHER))  # the original graph, carrying the hardened file's manifest
    stripped.metadata_props.extend(p for p in model.metadata_props if p.key == MANIFEST_KEY)
    onnx.save(stripped, str(tmp_path / "stripped.onnx"))
    code, out, _ = invoke(capsys, monkeypatch, "inspect", tmp_path / "stripped.onnx", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["hardened"] is False and "stripped" in doc["status"]
    assert all(not e["present"] for e in doc["insertions"])

    anonymous = onnx.ModelProto()
    anonymous.CopyFrom(model)
    kept = [p for p in anonymous.metadata_props if p.key != MANIFEST_KEY]
    del anonymous.metadata_props[:]
    anonymous.metadata_props.extend(kept)
    onnx.save(anonymous, str(tmp_path / "anonymous.onnx"))
    code, out, _ = invoke(capsys, monkeypatch, "inspect", tmp_path / "anonymous.onnx")
    assert code == 0 and "without a manifest" in out and f"{NODE_PREFIX}_3" in out

    broken = onnx.load(str(TEACHER))
    broken.metadata_props.append(onnx.StringStringEntryProto(key=MANIFEST_KEY, value="{not json"))
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    code, out, err = invoke(capsys, monkeypatch, "inspect", tmp_path / "broken.onnx", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["hardened"] is False and "not valid JSON" in doc["problems"][0], err


def test_inspect_and_layers_bad_input(capsys, monkeypatch, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a model at all")
    for args, expected in ((["inspect", tmp_path / "missing.onnx"], 2), (["layers", tmp_path / "missing.onnx"], 2),
                           (["inspect", TEACHER, "--size", "0x5"], 2), (["inspect", TEACHER, "--size", "big"], 2),
                           (["inspect", garbage], 4), (["layers", garbage], 4)):
        code, out, err = invoke(capsys, monkeypatch, *args)
        assert code == expected, (args, out, err)
        assert "Traceback" not in err and err.strip() and len(err.strip().splitlines()) <= 6
