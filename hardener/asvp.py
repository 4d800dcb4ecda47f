"""The ASVP subgraph: amplify the top-k singular values of a feature map with standard ONNX ops only.

For a feature map X of shape (N, C, H, W) the matrix M is, per sample, C x HW (``channel`` mode) or, per
sample and channel, H x W (``spatial`` mode).  With Q an orthonormal basis of the top-k left singular
subspace of M, scaling those k singular values by h is exactly

    M' = M + (h - 1) Q Q^T M

(it depends only on span(Q), so singular-vector signs and order do not matter).  ONNX has no SVD, so Q comes
from subspace iteration on the Gram matrix G = M M^T (float32, the one large product): G is normalised and,
in ``precision`` (float64 by default), squared ``squarings`` times; then Q <- orth(G^(2^s) Q) runs
``iterations`` times, orthonormalised by classical Gram-Schmidt, once per column in inner iterations and twice
("CGS2") in the last.  The start block is a deterministic function of ``seed`` and the row index
(cos(a_j i + b_j)), so it works for dynamic shapes and gives the same result on every runtime.  Channel mode
with at most DENSE_MAX_CHANNELS static channels applies (I + (h-1) Q Q^T) to M as one product; otherwise the
low-rank form above.  With a static channel count divisible by LAYOUT_CHANNEL_MULTIPLE the subgraph ends with an
identity depthwise 1x1 convolution, so that ONNX Runtime's CPU blocked (NCHWc) layout survives the insertion
(see build_asvp).

Cost: on CPU the spectral part (about 300 tiny nodes at k = 4) takes about 0.2 ms per insertion; what costs is
the passes over the large map (the Gram matrix, the update, and the layout reorders around them).

Numerical safety:
- G is unscaled (a pre-scaling pass cost a third of the subgraph's time): exact wherever the float32 sum of
  squares neither overflows nor underflows, max|M| from about 1e-17 to 1e17; outside that (non-finite G) the
  map passes through unchanged, never NaN;
- a column whose norm collapses under re-orthogonalisation (rank-deficient or all-zero maps) becomes exactly
  zero instead of amplified round-off, so an all-zero map comes back unchanged and never NaN;
- fp16/bf16 feature maps are computed in fp32 and cast back.

Adaptive rank (``adaptive_energy`` = p): per matrix, the smallest k' <= k whose Rayleigh-quotient energy
estimate sum_{j<k'} q_j^T G q_j reaches p * trace(G); columns beyond k' are masked out.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MODES = ("channel", "spatial")
PRECISIONS = {"float32": (np.float32, TensorProto.FLOAT), "float64": (np.float64, TensorProto.DOUBLE)}
FLT_MIN = float(np.finfo(np.float32).tiny)
# A re-orthogonalised column keeping less than this fraction of its norm is treated as dependent (below
# what the precision can resolve): it becomes exactly zero instead of amplified round-off.
DEPENDENT_COLUMN_RTOL = {np.float32: 1e-6, np.float64: 1e-13}


@dataclass(frozen=True)
class AsvpParams:
    """What one inserted subgraph does."""

    rank: int = 4
    gain: float = 1.3
    mode: str = "channel"
    # Subspace iterations; None: 32 / 2^squarings (32 effective iterations on G).
    iterations: int | None = None
    adaptive_energy: float | None = None
    seed: int = 0
    # Subspace iteration runs on G^(2^squarings): each squaring halves the iterations (and nodes) for the same
    # convergence, but directions with (s_k/s_1)^(2^(squarings+1)) below the precision's resolution are lost.
    # Measured on real maps (tests/test_asvp.py): float64 with 2 squarings and 8 iterations matches 32 plain
    # iterations (<= 1.6e-5 of the SVD where s(k+1)/s(k) <= 0.8) for k <= 4; k = 8 needs 1 squaring (2 give
    # 1.8e-2); float32 with one squaring already gives 2.5e-3.  A squaring costs rows^3 multiply-adds: nothing
    # for channel mode's C x C, but for spatial mode's H x H (H = 256: 32 x 17 M per map) it costs more than
    # the iterations it saves (measured: 1.54x instead of 1.25x for one insertion at 256^2).
    # None picks: 0 for float32 or spatial mode, else 2 for k <= 4 and 1 above.
    squarings: int | None = None
    # Arithmetic of the small rows x rows spectral part (squarings and iterations); the Gram matrix and the
    # reconstruction are float32.  None picks float64 in channel mode (C x C: free, and it allows squarings)
    # and float32 in spatial mode (H x H iterations are real arithmetic there).
    precision: str | None = None

    def resolved(self) -> "AsvpParams":
        """These parameters with ``None`` (automatic) values replaced by the ones that will be used."""
        precision = self.precision or ("float64" if self.mode == "channel" else "float32")
        squarings = self.squarings
        if squarings is None:
            squarings = 0 if (precision == "float32" or self.mode == "spatial") else (2 if self.rank <= 4 else 1)
        iterations = self.iterations if self.iterations is not None else max(1, 32 >> squarings)
        return replace(self, precision=precision, squarings=squarings, iterations=iterations)

    def check(self) -> None:
        from .errors import UsageError

        if self.mode not in MODES:
            raise UsageError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 1 <= self.rank <= 64:
            raise UsageError(f"rank k must be between 1 and 64, got {self.rank}")
        if not np.isfinite(self.gain) or self.gain <= 0:
            raise UsageError(f"gain h must be a positive finite number, got {self.gain}")
        if self.iterations is not None and not 1 <= self.iterations <= 256:
            raise UsageError(f"iterations must be between 1 and 256, got {self.iterations}")
        if self.seed < 0:
            raise UsageError(f"seed must be a non-negative integer, got {self.seed}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.squarings is not None and not 0 <= self.squarings <= 3:
            raise UsageError(f"squarings must be between 0 and 3, got {self.squarings}")
        if self.adaptive_energy is not None and not 0 < self.adaptive_energy <= 1:
            raise UsageError(f"adaptive energy p must be in (0, 1], got {self.adaptive_energy}")


def start_block_coefficients(rank: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies and phases of the deterministic start block Q0[i, j] = cos(a_j * i + b_j)."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.3, 3.0, size=rank).astype(np.float32)  # float32 values whatever the precision,
    b = rng.uniform(0.0, 2 * np.pi, size=rank).astype(np.float32)  # so both precisions start alike
    return a, b


@dataclass
class GraphBuilder:
    """Appends uniquely named nodes and initializers for one opset."""

    opset: int
    prefix: str
    taken: set[str]
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    _count: int = 0

    def fresh(self, stem: str) -> str:
        while True:
            name = f"{self.prefix}/{stem}_{self._count}"
            self._count += 1
            if name not in self.taken:
                self.taken.add(name)
                return name

    def op(self, op_type: str, inputs: list[str], outputs: list[str] | None = None, **attrs) -> str:
        outputs = outputs or [self.fresh(op_type.lower())]
        self.nodes.append(
            helper.make_node(op_type, inputs, outputs, name=self.fresh(op_type), **attrs)
        )
        return outputs[0]

    float_dtype: type = np.float32  # dtype of floating constants: the subgraph's compute precision

    def const(self, value, dtype=None, stem: str = "const") -> str:
        dtype = dtype or self.float_dtype
        name = self.fresh(stem)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def axes_op(self, op_type: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        """Reduce ops whose axes moved from attribute to input (ReduceSum at 13, the others at 18)."""
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes_as_input:
            return self.op(op_type, [x, self.const(axes, np.int64, "axes")], keepdims=keepdims)
        return self.op(op_type, [x], axes=axes, keepdims=keepdims)


# Channel mode applies y = (I + (h-1) Q Q^T) M as one C x C product (one pass over M) up to this many channels;
# above it the low-rank form M + Q ((h-1) Q^T M) is cheaper despite its extra passes.  Measured on CPU
# (ORT 1.32, 1 thread, 256x256 maps, k=4): C=16 dense 3.0 ms vs low-rank 3.5; C=32 6.7 vs 7.2; C=64 20.6 vs 18.0.
DENSE_MAX_CHANNELS = 32
# Static channel counts that end the subgraph with an identity depthwise convolution (see build_asvp): ONNX
# Runtime's NCHWc blocks are 8 (AVX2) or 16 (AVX-512) channels, and it keeps other counts in plain NCHW.
LAYOUT_CHANNEL_MULTIPLE = 8


def build_asvp(
    builder: GraphBuilder, x: str, out: str, params: AsvpParams, elem_type: int, channels: int | None = None
) -> None:
    """Append to ``builder`` the subgraph computing tensor ``out`` = ASVP(tensor ``x``).

    ``channels``: the map's static channel count where known (it picks the cheaper reconstruction).
    """
    b = builder
    params = params.resolved()
    k = params.rank
    b.float_dtype, compute = PRECISIONS[params.precision]
    # Reconstruction runs in float32 (fp16/bf16 maps are widened); only the spectral part may be float64.
    x32 = x if elem_type == TensorProto.FLOAT else b.op("Cast", [x], to=TensorProto.FLOAT)
    if params.mode == "channel":
        m32 = b.op("Reshape", [x32, b.const([0, 0, -1], np.int64, "shape")])  # (N, C, HW)
    else:
        m32 = x32  # (N, C, H, W): one H x W matrix per (sample, channel)
    # The Gram matrix is the one large product, in float32 and unscaled: floating point is scale-free between
    # underflow and overflow, so it is exact for max|M| from about 1e-17 to 1e17 (sum of squares within the
    # float32 range), and a pre-scaling pass over M would cost a third of the subgraph's time.  Outside that
    # range (non-finite G) the matrix is passed through unperturbed, never as NaN.
    gram32 = b.op("MatMul", [m32, b.op("Transpose", [m32], perm=_swap_last_two(params.mode))])
    gram = gram32 if compute == TensorProto.FLOAT else b.op("Cast", [gram32], to=compute)
    size = b.axes_op("ReduceSum", gram, [-2, -1])  # (.., 1, 1): inf or NaN if any entry is
    finite = b.op("Not", [b.op("Or", [b.op("IsInf", [size]), b.op("IsNaN", [size])])])
    gram = b.op("Where", [finite, gram, b.const(0.0)])
    # The small rows x rows spectral part runs in ``precision``, on G^(2^s) renormalised by its largest entry
    # (G is PSD: that is max|G|, on the diagonal).
    gram = _normalise(b, gram)
    power = gram
    for _ in range(params.squarings):
        power = _normalise(b, b.op("MatMul", [power, power]))

    # Deterministic start block (rows, k) from the dynamic row count.
    rows = b.op("Gather", [b.op("Shape", [gram]), b.const(-1, np.int64, "idx")], axis=0)
    rows = b.op("Cast", [rows], to=compute)
    row_idx = b.op("Range", [b.const(0.0), rows, b.const(1.0)])
    row_idx = b.op("Unsqueeze", [row_idx, b.const([1], np.int64, "axes")])
    diagonal = lambda: b.op("Equal", [row_idx, b.op("Transpose", [row_idx], perm=[1, 0])])  # noqa: E731 (rows, rows)
    a, ph = start_block_coefficients(k, params.seed)
    q = b.op("Cos", [b.op("Add", [b.op("Mul", [row_idx, b.const(a[None, :])]), b.const(ph[None, :])])])

    for i in range(params.iterations):
        q = _orthonormalize(b, b.op("MatMul", [power, q]), k, _swap_last_two(params.mode),
                            final=i == params.iterations - 1)

    if params.adaptive_energy is not None:
        # Rayleigh quotients q_j^T G q_j estimate the energy sigma_j^2 each column captures (of the normalised
        # matrix); trace(G) is the total.  Columns after the one that reaches p of the total are masked out.
        energy = b.axes_op("ReduceSum", b.op("Mul", [q, b.op("MatMul", [gram, q])]), [-2])  # (.., 1, k)
        total = b.axes_op("ReduceSum", b.op("Where", [diagonal(), gram, b.const(0.0)]), [-2, -1])  # trace
        frac = b.op("Div", [energy, b.op("Max", [total, b.const(FLT_MIN)])])
        before = b.op("CumSum", [frac, b.const(-1, np.int64, "axis")], exclusive=1)
        mask = b.op("Cast", [b.op("Less", [before, b.const(params.adaptive_energy)])], to=compute)
        q = b.op("Mul", [q, mask])

    q32 = q if compute == TensorProto.FLOAT else b.op("Cast", [q], to=TensorProto.FLOAT)
    q32_t = b.op("Transpose", [q32], perm=_swap_last_two(params.mode))
    if params.mode == "channel" and channels is not None and channels <= DENSE_MAX_CHANNELS:
        # y = (I + (h - 1) Q Q^T) M: the C x C operator is tiny, and applying it is one pass over M (one
        # MatMul) instead of three (Q^T M, Q (Q^T M), and the Add).
        eye = b.op("Cast", [diagonal()], to=TensorProto.FLOAT)
        operator = b.op("Add", [eye, b.op("Mul", [b.op("MatMul", [q32, q32_t]),
                                                  b.const(params.gain - 1.0, np.float32)])])
        y = b.op("MatMul", [operator, m32])
    else:  # H x H per channel would cost H/(2k) times the low-rank form
        coeff = b.op("Mul", [b.op("MatMul", [q32_t, m32]), b.const(params.gain - 1.0, np.float32)])
        y = b.op("Add", [m32, b.op("MatMul", [q32, coeff])])
    if params.mode == "channel":
        y = b.op("Reshape", [y, b.op("Shape", [x32])])
    if channels is not None and channels % LAYOUT_CHANNEL_MULTIPLE == 0:
        # An identity depthwise 1x1 convolution (weights 1, no bias: exact) as the last node.  ONNX Runtime's
        # CPU layout pass (NCHWc, at the default optimisation level) keeps a chain of convolutions and residual
        # Adds in a blocked layout only while every producer is one of its layout-aware ops; a MatMul/Add
        # output breaks the chain for the rest of the network, every later block paying a reorder out, an
        # unfused Add and a reorder in.  Measured on edsr20 (CPU, 2 threads, 256^2, k = 4, 3 runs each):
        # hardened/original 1.16-1.17 without it, 1.10-1.14 with it at 3 points, 1.09-1.13 vs 1.03-1.05 at one.
        # Where the runtime has no such layout (CUDA, other channel counts) it costs one pass over the map.
        y = b.op("Conv", [y, b.const(np.ones((channels, 1, 1, 1)), np.float32, "identity")],
                 group=channels, kernel_shape=[1, 1])
    if elem_type == TensorProto.FLOAT:
        b.op("Identity", [y], [out])
    else:
        b.op("Cast", [y], [out], to=elem_type)


def _normalise(b: GraphBuilder, g: str) -> str:
    """g / max(g) per matrix (g PSD, so its largest entry is its largest magnitude); zero stays zero."""
    return b.op("Div", [g, b.op("Max", [b.axes_op("ReduceMax", g, [-2, -1]), b.const(FLT_MIN)])])


def _swap_last_two(mode: str) -> list[int]:
    return [0, 2, 1] if mode == "channel" else [0, 1, 3, 2]


def _orthonormalize(b: GraphBuilder, z: str, k: int, perm: list[int], final: bool) -> str:
    """Columns of z (.., rows, k) -> orthonormal columns by classical Gram-Schmidt.

    Inner iterations project once (CGS): any loss of orthogonality is washed out by the next iteration,
    which only needs a well-conditioned basis of the same span.  The final one projects twice (CGS2, Q
    orthonormal to round-off, so Q Q^T is a projector) and turns dependent columns (rank-deficient or
    all-zero maps) into exact zeros instead of normalised round-off.
    """
    cols: list[str] = []
    if k == 1:
        parts = [z]
    else:  # one Split node (the 'split' input form is valid from opset 13 on)
        parts = [b.fresh("col") for _ in range(k)]
        b.op("Split", [z, b.const([1] * k, np.int64, "split")], parts, axis=-1)
    for j, col in enumerate(parts):
        norm0 = b.axes_op("ReduceL2", col, [-2]) if final else None
        if cols:
            basis = cols[0] if len(cols) == 1 else b.op("Concat", cols, axis=-1)
            basis_t = b.op("Transpose", [basis], perm=perm)
            for _ in range(2 if final else 1):
                col = b.op("Sub", [col, b.op("MatMul", [basis, b.op("MatMul", [basis_t, col])])])
        norm = b.axes_op("ReduceL2", col, [-2])
        unit = b.op("Div", [col, b.op("Max", [norm, b.const(FLT_MIN)])])
        if final:
            rtol = b.const(DEPENDENT_COLUMN_RTOL[b.float_dtype])
            unit = b.op("Where", [b.op("Greater", [norm, b.op("Mul", [norm0, rtol])]), unit, b.const(0.0)])
        cols.append(unit)
    return cols[0] if k == 1 else b.op("Concat", cols, axis=-1)


def standalone_model(
    params: AsvpParams,
    shape: list[int | str | None] | None = None,
    opset: int = 18,
    elem_type: int = TensorProto.FLOAT,
    ir_version: int = 8,
) -> onnx.ModelProto:
    """A model whose only job is y = ASVP(x): for tests, benchmarks and the attack suite."""
    shape = shape if shape is not None else ["N", "C", "H", "W"]
    builder = GraphBuilder(opset=opset, prefix="asvp", taken={"x", "y"})
    build_asvp(builder, "x", "y", params, elem_type, channels=shape[1] if isinstance(shape[1], int) else None)
    graph = helper.make_graph(
        builder.nodes,
        "asvp",
        [helper.make_tensor_value_info("x", elem_type, shape)],
        [helper.make_tensor_value_info("y", elem_type, shape)],
        initializer=builder.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model
