#!/usr/bin/env python3
"""Cost of hardening: hardened/original latency on ONNX Runtime, and the exact-SVD alternative, in one run.

For each configuration (input size x insertion points x mode x k) the original and the hardened sessions run
in interleaved pairs after a warm-up; the reported ratio is the median of per-pair ratios (and its 90th
percentile), so drift in machine load cancels.  On CPU the column ``cpu`` is the median ratio of process CPU
time (all intra-op threads), which does not count time other processes hold the cores: on a shared machine it
is the steadier of the two.  On CUDA, input and outputs stay on the GPU (IOBinding with
pre-allocated outputs), TF32 is off, and ``--cuda-graph`` replays a captured CUDA graph (static shapes).

A second table times, on the same feature map (the teacher's ``body.1.conv2`` output at that input size)
and device, the ASVP subgraph alone (ONNX Runtime) against the exact alternative it replaces:
``torch.linalg.svd`` in float32 plus the rank-k reconstruction.

Beside each ratio it prints the configuration's FLOP floor, ``1 + insertion MACs / model MACs``: the model's
multiply-adds (Conv, ConvTranspose, MatMul, Gemm) and the inserted ones, both counted from the tensor shapes at
that input size (one probe run of the original model).  An insertion's MACs are what any exact method must
do: the Gram matrix (rows^2 x cols per matrix: C^2 HW in channel mode, H^2 W per channel in spatial mode) and
the rank-k update Q (Q^T M) (2 k rows x cols); the small spectral part (C^3-sized, or H^3 in spatial mode for
squarings) is left out.  ``vs floor`` is (ratio - 1) / (floor - 1): 1 is the floor, 2 pays twice the
floor's overhead.

Prints both tables and writes JSON (schema ``hardener.bench/1``; rows gain ``cpu_ratio_median`` (null on
CUDA), ``model_macs``, ``insertion_macs``, ``flop_floor`` and ``overhead_vs_floor``)::

    python scripts/bench_overhead.py                          # CPU, 256^2 and 512^2, 1 and 3 points, k=1,2,4
    python scripts/bench_overhead.py --quick                  # 64^2, few repeats: checks that it runs (CI)
    python scripts/bench_overhead.py --providers cuda --cuda-graph
    python scripts/bench_overhead.py --model edsr20           # a 20-conv, 64-channel x2 SR net (see below)

How much an insertion costs relative to the model depends on the model: an insertion's floor is two
C x C x HW products (the Gram matrix and applying the C x C operator) plus a few passes over the map, while
a 3x3 convolution is 9 C x C x HW.  The bundled teacher (10 convolutions of 32 channels, and a bicubic
skip) is a small-model worst case; ``--model edsr20`` builds the shape of network the overhead goal was
stated for (20 convolutions: head, 9 residual blocks of 64 channels, tail, PixelShuffle x2, bicubic skip;
random weights, since latency does not depend on them; exported with torch.onnx, dynamo, opset 18).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

from hardener.api import HardenConfig, harden
from hardener.asvp import PRECISIONS, AsvpParams, standalone_model
from hardener.inspection import node_macs
from hardener.runtime import make_session, probe_model, resolve_providers

TEACHER = Path(__file__).resolve().parents[1] / "hardener" / "assets" / "sr_x2.onnx"
LAYER_SETS = {1: ["body.1.conv2"], 3: ["body.0.conv2", "body.1.conv2", "body.2.conv2"]}
PROBE_LAYER = "body.1.conv2"


class Runner:
    """Runs one session on one fixed input: plain ``run`` on CPU, IOBinding with device buffers on CUDA."""

    def __init__(self, session, feed: dict[str, np.ndarray]):
        import onnxruntime as ort

        self.session = session
        self.cuda = session.get_providers()[0] == "CUDAExecutionProvider"
        self.feed = feed
        if not self.cuda:
            return
        outputs = session.run(None, feed)  # output shapes (a warm-up too)
        self.binding = session.io_binding()
        self._keep = []  # device buffers must outlive the binding (and stay put for CUDA graphs)
        for name, value in feed.items():
            buf = ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0)
            self._keep.append(buf)
            self.binding.bind_ortvalue_input(name, buf)
        for meta, value in zip(session.get_outputs(), outputs):
            buf = ort.OrtValue.ortvalue_from_shape_and_type(value.shape, value.dtype, "cuda", 0)
            self._keep.append(buf)
            self.binding.bind_ortvalue_output(meta.name, buf)

    def __call__(self) -> None:
        if self.cuda:
            self.session.run_with_iobinding(self.binding)  # returns once the device work is done
        else:
            self.session.run(None, self.feed)


def pair_ratios(a: Runner, b: Runner, repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        a()
        b()
    ta, tb, ratios, cpu_ratios = [], [], [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        a()
        c1, t1 = time.process_time(), time.perf_counter()
        b()
        c2, t2 = time.process_time(), time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
        cpu_ratios.append((c2 - c1) / max(c1 - c0, 1e-9))
    stats = {"original_ms": statistics.median(ta) * 1e3, "hardened_ms": statistics.median(tb) * 1e3,
             "ratio_median": statistics.median(ratios), "ratio_p90": float(np.percentile(ratios, 90))}
    # CPU: the ratio of process CPU time (all intra-op threads) too; unlike wall time it does not count the time
    # other processes hold the cores, so it stays meaningful on a loaded machine.  Not defined on CUDA.
    stats["cpu_ratio_median"] = None if a.cuda else statistics.median(cpu_ratios)
    return stats


def median_ms(fn, repeats: int, warmup: int, sync=lambda: None) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


MAC_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def tensor_shapes(model: Path, names: list[str], size: int, providers, threads) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of ``names`` (and of every initializer) when the model runs on a 1x3xSxS input."""
    proto = onnx.load(str(model))
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    shapes = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    shapes.update({i.name: x.shape for i in proto.graph.input})
    wanted = [n for n in dict.fromkeys(names) if n and n not in shapes]
    elem = {o.name: o.type.tensor_type.elem_type for o in list(proto.graph.value_info) + list(proto.graph.output)}
    probe = probe_model(proto, [(n, elem.get(n, onnx.TensorProto.FLOAT)) for n in wanted])
    session = make_session(probe.SerializeToString(), providers, tf32=False, threads=threads)
    values = session.run(wanted, {session.get_inputs()[0].name: x})
    shapes.update({n: tuple(v.shape) for n, v in zip(wanted, values)})
    return shapes


def model_macs(proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-adds of the model's Conv, ConvTranspose, MatMul and Gemm nodes, from measured tensor shapes."""
    return sum(node_macs(n, shapes) or 0 for n in proto.graph.node if n.op_type in MAC_OPS)


def mac_tensors(proto: onnx.ModelProto) -> list[str]:
    """The tensors whose shapes ``model_macs`` reads."""
    return [t for n in proto.graph.node if n.op_type in MAC_OPS for t in (n.input[0], n.input[1], n.output[0])]


def insertion_macs(shape: tuple[int, ...], mode: str, rank: int) -> int:
    """An insertion's floor: its Gram matrix and the rank-k update Q (Q^T M), on one (N, C, H, W) map."""
    n, c, h, w = shape
    if mode == "channel":  # per sample, M is C x HW
        rows, cols, matrices = c, h * w, n
    else:  # per sample and channel, M is H x W
        rows, cols, matrices = h, w, n * c
    return matrices * (rows * rows * cols + 2 * rank * rows * cols)


def build_edsr20(directory: Path) -> Path:
    """The 20-convolution x2 SR benchmark network (module paths body.N.conv2, like the teacher's)."""
    import torch
    from torch.export import Dim

    from attacks.students import ResidualRestorer

    torch.manual_seed(0)
    net = ResidualRestorer(64, 9, 2).eval()
    torch.nn.init.normal_(net.tail.weight, std=1e-3)  # not the zero init of a fresh student
    x = torch.rand(1, 3, 48, 40)
    dyn = {"x": {2: Dim("height", min=4, max=8192), 3: Dim("width", min=4, max=8192)}}
    program = torch.onnx.export(net, (x,), None, dynamo=True, opset_version=18, external_data=False,
                                input_names=["x"], output_names=["y"], dynamic_shapes=dyn, verbose=False)
    path = directory / "edsr20.onnx"
    onnx.save(program.model_proto, str(path))
    return path


def feature_map(model: Path, size: int, providers, threads) -> np.ndarray:
    """The teacher's PROBE_LAYER output on a seeded input of size x size (real map shape and statistics)."""
    from hardener.layers import LayerIndex

    proto = onnx.load(str(model))
    [(_, layer)] = LayerIndex(proto).select([PROBE_LAYER])
    probe = probe_model(proto, [(layer.tensor, layer.elem_type)])
    session = make_session(probe.SerializeToString(), providers, tf32=False, threads=threads)
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    return session.run([layer.tensor], {session.get_inputs()[0].name: x})[0]


def reference_row(fmap: np.ndarray, params: AsvpParams, providers, threads, repeats, warmup) -> dict:
    """ASVP subgraph alone (ORT) vs torch.linalg.svd + reconstruction (float32), same map, same device."""
    import torch

    session = make_session(standalone_model(params).SerializeToString(), providers, tf32=False, threads=threads)
    subgraph_ms = median_ms(Runner(session, {"x": fmap}), repeats, warmup)
    cuda = providers[0] == "CUDAExecutionProvider"
    if cuda and not torch.cuda.is_available():
        return {"subgraph_ms": subgraph_ms, "svd_ms": None, "svd_device": "unavailable"}
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(threads)
    t = torch.from_numpy(fmap).to(device)
    n, c, h, w = t.shape
    k, gain = params.rank, params.gain

    def exact():
        m = t.reshape(n, c, h * w) if params.mode == "channel" else t
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        uk = u[..., :k]
        return m + (gain - 1.0) * uk @ (uk.transpose(-1, -2) @ m)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.no_grad():
        svd_ms = median_ms(exact, max(3, repeats // 4), max(1, warmup), sync)
    return {"subgraph_ms": subgraph_ms, "svd_ms": svd_ms, "svd_device": device}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(TEACHER),
                    help="an ONNX file, or 'edsr20' (built here); default: the bundled x2 SR teacher")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="input side (LR for the teacher)")
    ap.add_argument("--points", type=int, nargs="+", default=[1, 3], choices=sorted(LAYER_SETS))
    ap.add_argument("--modes", nargs="+", default=["channel", "spatial"], choices=["channel", "spatial"])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--iterations", type=int, default=None, help="default: automatic (AsvpParams)")
    ap.add_argument("--squarings", type=int, default=None, help="default: automatic (AsvpParams)")
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default=AsvpParams.precision)
    ap.add_argument("--providers", default="cpu", help="cpu or cuda")
    ap.add_argument("--cuda-graph", action="store_true", help="CUDA: enable_cuda_graph (capture, then replay)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (CPU)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-reference", action="store_true", help="skip the torch.linalg.svd table")
    ap.add_argument("--quick", action="store_true", help="64^2, k=1 and 4, 3 repeats: checks that it runs")
    ap.add_argument("--json", type=Path, default=Path("bench_overhead.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.ranks, args.repeats, args.warmup = [64], [1, 4], 3, 1
    providers = resolve_providers(args.providers.split(","))
    cuda = providers[0] == "CUDAExecutionProvider"
    cuda_options = {"enable_cuda_graph": "1"} if (cuda and args.cuda_graph) else None
    if args.cuda_graph and not cuda:
        ap.error("--cuda-graph needs --providers cuda")
    import onnxruntime as ort

    rows, refs = [], []
    scratch = tempfile.TemporaryDirectory()
    if args.model == "edsr20":
        import logging
        import warnings

        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        args.model = build_edsr20(Path(scratch.name))
    args.model = Path(args.model)
    if not args.model.is_file():
        ap.error(f"--model: no such file {args.model}")
    # The FLOP floor's ingredients, from shapes at each benchmark size: the model's MACs, the layers' maps.
    from hardener.layers import LayerIndex

    proto = onnx.load(str(args.model))
    index = LayerIndex(proto)
    layer_sets = {p: [layer.tensor for _, layer in index.select(LAYER_SETS[p])] for p in args.points}
    wanted = mac_tensors(proto) + [t for ts in layer_sets.values() for t in ts]
    macs, map_shapes = {}, {}
    for size in args.sizes:  # one probe run per size gives both
        map_shapes[size] = tensor_shapes(args.model, wanted, size, providers, args.threads)
        macs[size] = model_macs(proto, map_shapes[size])
    print(f"{'provider':>8} {'size':>5} {'pts':>3} {'mode':>7} {'k':>2} {'S':>1} {'it':>2} {'nodes':>6} "
          f"{'original ms':>11} {'hardened ms':>11} {'ratio':>6} {'p90':>6} {'cpu':>6} {'floor':>6} {'vs floor':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            for k in args.ranks:
                params = AsvpParams(rank=k, mode=mode, iterations=args.iterations, squarings=args.squarings,
                                    precision=args.precision).resolved()
                for points in args.points:
                    out = Path(tmp) / f"h_{points}_{mode}_{k}.onnx"
                    result = harden(args.model, out, HardenConfig(layers=LAYER_SETS[points], params=params,
                                                                  validate=False, force=True))
                    nodes = sum(i["nodes"] for i in result.report["insertions"])
                    for size in args.sizes:
                        # one session pair per size: a captured CUDA graph is bound to its shapes
                        original = make_session(args.model, providers, False, args.threads, cuda_options)
                        hardened = make_session(out, providers, False, args.threads, cuda_options)
                        x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
                        feed = {original.get_inputs()[0].name: x}
                        stats = pair_ratios(Runner(original, feed), Runner(hardened, feed), args.repeats,
                                            args.warmup)
                        added = sum(insertion_macs(map_shapes[size][t], mode, k) for t in layer_sets[points])
                        floor = 1.0 + added / macs[size]
                        row = {"provider": providers[0], "cuda_graph": bool(cuda_options), "size": size,
                               "points": points, "mode": mode, "rank": k, "squarings": params.squarings,
                               "iterations": params.iterations, "precision": params.precision,
                               "inserted_nodes": nodes, **stats, "model_macs": macs[size],
                               "insertion_macs": added, "flop_floor": floor,
                               "overhead_vs_floor": (stats["ratio_median"] - 1.0) / (floor - 1.0)}
                        rows.append(row)
                        cpu = "-" if stats["cpu_ratio_median"] is None else f"{stats['cpu_ratio_median']:6.3f}"
                        print(f"{providers[0][:-17]:>8} {size:>4}² {points:>3} {mode:>7} {k:>2} "
                              f"{params.squarings:>1} {params.iterations:>2} {nodes:>6} "
                              f"{stats['original_ms']:11.2f} {stats['hardened_ms']:11.2f} "
                              f"{stats['ratio_median']:6.3f} {stats['ratio_p90']:6.3f} {cpu:>6} {floor:6.3f} "
                              f"{row['overhead_vs_floor']:8.2f}  hardened/original", flush=True)
        if not args.no_reference:
            print(f"\nASVP subgraph alone vs torch.linalg.svd (float32) + reconstruction, on the "
                  f"{PROBE_LAYER} map:")
            print(f"{'size':>5} {'map':>16} {'mode':>7} {'k':>2} {'subgraph ms':>11} {'svd ms':>9} {'svd/subgraph':>12}")
            for size in args.sizes:
                fmap = feature_map(args.model, size, providers, args.threads)
                for mode in args.modes:
                    for k in args.ranks:
                        params = AsvpParams(rank=k, mode=mode, iterations=args.iterations,
                                            squarings=args.squarings, precision=args.precision).resolved()
                        ref = reference_row(fmap, params, providers, args.threads, args.repeats, args.warmup)
                        ref.update({"size": size, "map_shape": list(fmap.shape), "mode": mode, "rank": k})
                        refs.append(ref)
                        svd = "-" if ref["svd_ms"] is None else f"{ref['svd_ms']:9.2f}"
                        speed = "-" if ref["svd_ms"] is None else f"{ref['svd_ms'] / ref['subgraph_ms']:12.1f}"
                        print(f"{size:>4}² {'x'.join(map(str, fmap.shape)):>16} {mode:>7} {k:>2} "
                              f"{ref['subgraph_ms']:11.2f} {svd:>9} {speed:>12}", flush=True)
    scratch.cleanup()
    report = {"schema": "hardener.bench/1", "model": str(args.model), "threads": args.threads,
              "onnxruntime": ort.__version__, "machine": platform.machine(), "processor": platform.processor(),
              "defaults": asdict(AsvpParams().resolved()), "rows": rows, "reference": refs}
    tmp_json = args.json.with_name(args.json.name + ".tmp")
    tmp_json.write_text(json.dumps(report, indent=2))
    tmp_json.replace(args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
