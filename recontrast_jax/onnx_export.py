"""ONNX export: the exported predict function as an ONNX graph.

ONNX Runtime and OpenVINO, the runtimes of inspection-line CPUs, read ONNX. The
graph is written from the jaxpr of `export.inference_fn` (the function the
`jax.export` artifact holds), primitive by primitive, with the `onnx` library:

- Everything computable without the images is evaluated here (constant
  folding): the variables, BatchNorm's `rsqrt(var + eps) * scale`, iotas, the
  blur and resize matrices. Broadcasts stay broadcastable (a per-channel scale
  is a `[1, C, 1, 1]` constant, not an activation-sized one).
- Convolutions keep XLA's native form (`lax.platform_dependent` resolves to its
  default branch, not the CPU matmul kernels) and are laid out NCHW, ONNX's
  layout; every value remembers its physical axis order, so a chain of
  convolutions, BatchNorms and ReLUs needs no transposes.
- A BatchNorm after a convolution (or any per-channel affine) is folded into
  the convolution's weights and bias.
- The batch dimension is symbolic (`batch`): shapes that depend on it are
  computed in the graph from the input's shape.
- `lax.map`/`lax.scan` (the memory-bank search) become ONNX `Loop`s, which
  OpenVINO nests (it rejects nested `Scan`s).

A primitive without a translation raises `UnsupportedPrimitive` naming it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.extend import core as jex_core

try:  # the `onnx` extra; `export` writes no ONNX model without it
    import onnx
    from onnx import helper, numpy_helper
except ImportError:
    onnx = helper = numpy_helper = None

OPSET = 18
INT64_MAX = np.iinfo(np.int64).max
BATCH_DIM = "batch"


class UnsupportedPrimitive(NotImplementedError):
    """A jaxpr primitive (or a form of one) the ONNX export does not translate."""


@dataclasses.dataclass
class Tensor:
    """A jaxpr value during conversion: a folded constant or a graph tensor.

    Attributes:
      shape: logical (jaxpr) shape; may hold the symbolic batch dimension.
      dtype: numpy dtype.
      const: the value, when known (logical axis order).
      name: the ONNX tensor name otherwise.
      perm: physical axis order of `name`: physical = transpose(logical, perm).
      bshape: the logical shape with 1 where the value is still to be broadcast
        (ONNX elementwise operators broadcast it).
    """

    shape: tuple
    dtype: np.dtype
    const: np.ndarray | None = None
    name: str | None = None
    perm: tuple | None = None
    bshape: tuple | None = None

    def __post_init__(self):
        if self.perm is None:
            self.perm = tuple(range(len(self.shape)))
        if self.bshape is None:
            self.bshape = tuple(self.const.shape) if self.is_const else self.shape

    @property
    def is_const(self) -> bool:
        return self.const is not None

    @property
    def full(self) -> bool:
        return _same_dims(self.bshape, self.shape)


def _is_static(dim) -> bool:
    return isinstance(dim, (int, np.integer))


def _same_dims(a, b) -> bool:
    return len(a) == len(b) and all(
        _is_static(x) == _is_static(y) and x == y for x, y in zip(a, b, strict=True)
    )


def _static_shape(shape) -> bool:
    return all(_is_static(d) for d in shape)


def _onnx_dtype(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class GraphBuilder:
    """Nodes and initializers of one ONNX graph (a Loop body has its own nodes)."""

    def __init__(self, root: GraphBuilder | None = None):
        self.root = root or self
        self.nodes: list[onnx.NodeProto] = []
        if root is None:
            self.initializers: list[onnx.TensorProto] = []
            self.counter = itertools.count()
            self.batch_tensor: str | None = None
            self.const_names: dict[int, tuple[np.ndarray, str]] = {}

    def fresh(self, hint: str = "t") -> str:
        return f"{hint}_{next(self.root.counter)}"

    def node(self, op: str, inputs: Sequence[str], outputs=1, **attrs) -> list[str]:
        names = [self.fresh(op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), names, **attrs))
        return names

    def op(self, op: str, *inputs: str, **attrs) -> str:
        return self.node(op, inputs, **attrs)[0]

    def constant(self, value) -> str:
        """An initializer of the root graph (Loop bodies read it by name)."""
        value = np.asarray(value)
        root = self.root
        key = id(value)
        if key in root.const_names and root.const_names[key][0] is value:
            return root.const_names[key][1]
        name = root.fresh("const")
        root.initializers.append(numpy_helper.from_array(value, name))
        root.const_names[key] = (value, name)
        return name

    def ints(self, values) -> str:
        return self.constant(np.asarray(values, np.int64))

    # -- symbolic dimensions ------------------------------------------------

    def dim(self, dim) -> str:
        """A 1-D int64 tensor holding `dim` (an int or a linear batch expression)."""
        if _is_static(dim):
            return self.ints([int(dim)])
        symbol = self.root.batch_symbol
        at0, at1 = dim._evaluate({symbol: 0}), dim._evaluate({symbol: 1})
        slope = at1 - at0
        if dim._evaluate({symbol: 7}) != 7 * slope + at0:
            raise UnsupportedPrimitive(f"dimension {dim} is not linear in the batch")
        value = self.root.batch_tensor
        if slope != 1:
            value = self.op("Mul", value, self.ints([slope]))
        if at0:
            value = self.op("Add", value, self.ints([at0]))
        return value

    def dims(self, dims) -> str:
        """A 1-D int64 tensor of `dims` (constant when all are static)."""
        if _static_shape(dims):
            return self.ints([int(d) for d in dims])
        return self.op("Concat", *[self.dim(d) for d in dims], axis=0)

    def reshape_target(self, dims) -> str:
        """Reshape's shape input: one symbolic dimension becomes -1."""
        symbolic = [i for i, d in enumerate(dims) if not _is_static(d)]
        if len(symbolic) == 1:
            return self.ints(
                [-1 if i == symbolic[0] else int(d) for i, d in enumerate(dims)]
            )
        return self.dims(dims)

    # -- tensors --------------------------------------------------------------

    def name_of(self, t: Tensor, perm: tuple | None = None, full: bool = False) -> str:
        """`t` in the physical order `perm` (default its own), broadcast if `full`."""
        perm = t.perm if perm is None else tuple(perm)
        if t.is_const:
            value = t.const
            if full and not t.full:
                if not _static_shape(t.shape):
                    return self._expand(self.constant(value.transpose(perm)), t, perm)
                value = np.broadcast_to(value, t.shape)
            return self.constant(np.ascontiguousarray(value.transpose(perm)))
        name = t.name
        if perm != t.perm:
            relative = [t.perm.index(a) for a in perm]
            name = self.op("Transpose", name, perm=relative)
        if full and not t.full:
            name = self._expand(name, t, perm)
        return name

    def _expand(self, name: str, t: Tensor, perm) -> str:
        return self.op("Expand", name, self.dims([t.shape[a] for a in perm]))


def _const(value, aval=None) -> Tensor:
    value = np.asarray(value)
    shape = tuple(aval.shape) if aval is not None else value.shape
    return Tensor(shape, value.dtype, const=value)


def _out(aval, name: str, perm=None, bshape=None) -> Tensor:
    return Tensor(
        tuple(aval.shape), np.dtype(aval.dtype), name=name, perm=perm, bshape=bshape
    )


# ----------------------------------------------------------------------------
# Interpreting a jaxpr

Handler = Callable[[GraphBuilder, object, list[Tensor]], list[Tensor]]
HANDLERS: dict[str, Handler] = {}


def handles(*names: str):
    def register(fn):
        for name in names:
            HANDLERS[name] = fn
        return fn

    return register


def convert_closed(b: GraphBuilder, closed, args: Sequence[Tensor]) -> list[Tensor]:
    consts = [_const(c) for c in closed.consts]
    return convert_jaxpr(b, closed.jaxpr, consts, args)


def convert_jaxpr(b: GraphBuilder, jaxpr, consts, args) -> list[Tensor]:
    env: dict = {}

    def read(v) -> Tensor:
        if isinstance(v, jex_core.Literal):
            return _const(np.asarray(v.val, dtype=v.aval.dtype), v.aval)
        return env[v]

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = value
    for var, value in zip(jaxpr.invars, args, strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        outs = convert_eqn(b, eqn, [read(v) for v in eqn.invars])
        for var, value in zip(eqn.outvars, outs, strict=True):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def convert_eqn(b: GraphBuilder, eqn, inputs: list[Tensor]) -> list[Tensor]:
    name = eqn.primitive.name
    if name in _CALLS:
        return convert_closed(b, _called_jaxpr(eqn), inputs)
    if _foldable(eqn, inputs):
        return _fold(eqn, inputs)
    handler = HANDLERS.get(name)
    if handler is None:
        raise UnsupportedPrimitive(
            f"the ONNX export has no translation of the jax primitive {name!r}"
        )
    return handler(b, eqn, inputs)


_CALLS = ("jit", "pjit", "custom_jvp_call", "custom_vjp_call", "closed_call", "remat")
_NO_FOLD = ("broadcast_in_dim", "platform_index", "dim_as_value")


def _called_jaxpr(eqn):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            return eqn.params[key]
    raise UnsupportedPrimitive(f"{eqn.primitive.name}: no called jaxpr")


def _foldable(eqn, inputs: list[Tensor]) -> bool:
    if eqn.primitive.name in _NO_FOLD or not all(t.is_const for t in inputs):
        return False
    return all(_static_shape(v.aval.shape) for v in eqn.outvars) and all(
        _static_shape(t.shape) for t in inputs
    )


def _fold(eqn, inputs: list[Tensor]) -> list[Tensor]:
    """Evaluates an equation whose inputs are all known, as `jax.core.eval_jaxpr`."""
    values = [np.broadcast_to(t.const, t.shape) for t in inputs]
    params = eqn.primitive.get_bind_params(eqn.params)
    outs = eqn.primitive.bind(*values, **params)
    outs = outs if eqn.primitive.multiple_results else [outs]
    return [
        _const(np.asarray(o), v.aval) for o, v in zip(outs, eqn.outvars, strict=True)
    ]


# ----------------------------------------------------------------------------
# Elementwise primitives (ONNX broadcasts their operands)

_ELEMENTWISE = {
    "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max",
    "min": "Min", "pow": "Pow", "lt": "Less", "gt": "Greater",
    "le": "LessOrEqual", "ge": "GreaterOrEqual", "eq": "Equal", "and": "And",
    "or": "Or", "not": "Not", "exp": "Exp", "log": "Log", "sqrt": "Sqrt",
    "neg": "Neg", "abs": "Abs", "tanh": "Tanh", "logistic": "Sigmoid",
    "erf": "Erf", "floor": "Floor", "ceil": "Ceil", "sign": "Sign",
}  # fmt: skip


def _broadcast_shape(tensors: list[Tensor], rank: int) -> tuple:
    dims = [1] * rank
    for t in tensors:
        for axis, d in enumerate(t.bshape):
            if not (_is_static(d) and d == 1):
                dims[axis] = d
    return tuple(dims)


def _elementwise(b: GraphBuilder, eqn, inputs, build) -> list[Tensor]:
    """Puts the operands in one physical order and applies `build(names)`."""
    aval = eqn.outvars[0].aval
    rank = len(aval.shape)
    ranked = [t for t in inputs if len(t.shape) == rank and rank]
    graph = [t for t in ranked if not t.is_const]
    perm = graph[0].perm if graph else tuple(range(rank))
    names = [
        b.name_of(t, perm) if len(t.shape) == rank else b.name_of(t) for t in inputs
    ]
    bshape = _broadcast_shape(ranked, rank)
    return [_out(aval, build(names), perm, bshape)]


def _simple(op: str) -> Handler:
    return lambda b, eqn, ins: _elementwise(b, eqn, ins, lambda n: b.op(op, *n))


for _name, _op in _ELEMENTWISE.items():
    HANDLERS[_name] = _simple(_op)


@handles("rsqrt")
def _rsqrt(b, eqn, ins):
    return _elementwise(b, eqn, ins, lambda n: b.op("Reciprocal", b.op("Sqrt", n[0])))


@handles("ne")
def _ne(b, eqn, ins):
    return _elementwise(b, eqn, ins, lambda n: b.op("Not", b.op("Equal", *n)))


@handles("square")
def _square(b, eqn, ins):
    return _elementwise(b, eqn, ins, lambda n: b.op("Mul", n[0], n[0]))


@handles("integer_pow")
def _integer_pow(b, eqn, ins):
    y = eqn.params["y"]
    exponent = b.constant(np.asarray(y, ins[0].dtype))
    return _elementwise(b, eqn, ins, lambda n: b.op("Pow", n[0], exponent))


@handles("stop_gradient", "copy", "copy_p", "optimization_barrier", "reduce_precision")
def _identity(b, eqn, ins):
    return ins[: len(eqn.outvars)]


@handles("convert_element_type")
def _convert(b, eqn, ins):
    to = _onnx_dtype(eqn.outvars[0].aval.dtype)
    return _elementwise(b, eqn, ins, lambda n: b.op("Cast", n[0], to=to))


@handles("select_n")
def _select_n(b, eqn, ins):
    if len(ins) != 3:
        raise UnsupportedPrimitive("select_n with more than two cases")
    return _elementwise(b, eqn, ins, lambda n: b.op("Where", n[0], n[2], n[1]))


@handles("clamp")
def _clamp(b, eqn, ins):
    def build(n):
        return b.op("Max", b.op("Min", n[1], n[2]), n[0])

    return _elementwise(b, eqn, ins, build)


# ----------------------------------------------------------------------------
# Shapes and layouts


@handles("broadcast_in_dim")
def _broadcast_in_dim(b, eqn, ins):
    (x,) = ins[:1]
    aval = eqn.outvars[0].aval
    dims = eqn.params["broadcast_dimensions"]
    rank = len(aval.shape)
    bshape = [1] * rank
    for source, target in enumerate(dims):
        bshape[target] = x.bshape[source]
    missing = [a for a in range(rank) if a not in dims]
    if x.is_const:
        return [Tensor(tuple(aval.shape), x.const.dtype, const=x.const.reshape(bshape))]
    name = b.name_of(x, tuple(range(len(x.shape))))
    if missing:
        name = b.op("Unsqueeze", name, b.ints(missing))
    return [_out(aval, name, bshape=tuple(bshape))]


def _renumber_after_removing(perm: tuple, removed: Sequence[int]) -> tuple:
    kept = [a for a in perm if a not in removed]
    return tuple(a - sum(r < a for r in removed) for a in kept)


@handles("reshape")
def _reshape(b, eqn, ins):
    x = ins[0]
    aval = eqn.outvars[0].aval
    name = b.name_of(x, tuple(range(len(x.shape))), full=True)
    return [_out(aval, b.op("Reshape", name, b.reshape_target(aval.shape)))]


@handles("squeeze")
def _squeeze(b, eqn, ins):
    (x,) = ins
    axes = [a % len(x.shape) for a in eqn.params["dimensions"]]
    physical = [x.perm.index(a) for a in axes]
    name = b.op("Squeeze", b.name_of(x), b.ints(physical))
    bshape = tuple(d for a, d in enumerate(x.bshape) if a not in axes)
    perm = _renumber_after_removing(x.perm, axes)
    return [_out(eqn.outvars[0].aval, name, perm, bshape)]


@handles("transpose")
def _transpose(b, eqn, ins):
    (x,) = ins
    permutation = tuple(eqn.params["permutation"])
    aval = eqn.outvars[0].aval
    bshape = tuple(x.bshape[a] for a in permutation)
    if x.is_const:
        return [
            Tensor(tuple(aval.shape), x.dtype, const=x.const.transpose(permutation))
        ]
    perm = tuple(permutation.index(a) for a in x.perm)
    return [_out(aval, x.name, perm, bshape)]


@handles("concatenate")
def _concatenate(b, eqn, ins):
    axis = eqn.params["dimension"]
    graph = [t for t in ins if not t.is_const]
    perm = graph[0].perm if graph else tuple(range(len(ins[0].shape)))
    names = [b.name_of(t, perm, full=True) for t in ins]
    name = b.op("Concat", *names, axis=perm.index(axis))
    return [_out(eqn.outvars[0].aval, name, perm)]


@handles("stack")
def _stack(b, eqn, ins):
    axis = eqn.params["axis"]
    identity = tuple(range(len(ins[0].shape)))
    names = [
        b.op("Unsqueeze", b.name_of(t, identity, full=True), b.ints([axis]))
        for t in ins
    ]
    return [_out(eqn.outvars[0].aval, b.op("Concat", *names, axis=axis))]


@handles("pad")
def _pad(b, eqn, ins):
    x, value = ins
    config = eqn.params["padding_config"]
    if any(interior for _, _, interior in config) or not value.is_const:
        raise UnsupportedPrimitive("pad with interior padding or a computed value")
    begins = [int(config[a][0]) for a in x.perm]
    ends = [int(config[a][1]) for a in x.perm]
    pads = b.ints(begins + ends)
    fill = b.constant(np.asarray(value.const, x.dtype).reshape(()))
    name = b.op("Pad", b.name_of(x, full=True), pads, fill, mode="constant")
    return [_out(eqn.outvars[0].aval, name, x.perm)]


def _slice(b, x: Tensor, starts, limits, steps, aval) -> Tensor:
    """ONNX Slice of logical `x` (starts/limits may be batch expressions)."""
    axes, begin, end, step = [], [], [], []
    for axis, (s, e, st) in enumerate(zip(starts, limits, steps, strict=True)):
        if _is_static(s) and s == 0 and st == 1 and _same_dims((e,), (x.shape[axis],)):
            continue
        axes.append(x.perm.index(axis))
        begin.append(s)
        end.append(INT64_MAX if _same_dims((e,), (x.shape[axis],)) else e)
        step.append(st)
    name = b.name_of(x, full=True)
    if axes:
        name = b.op(
            "Slice", name, b.dims(begin), b.dims(end), b.ints(axes), b.ints(step)
        )
    return _out(aval, name, x.perm)


@handles("slice")
def _slice_handler(b, eqn, ins):
    (x,) = ins
    p = eqn.params
    steps = p["strides"] or (1,) * len(x.shape)
    return [
        _slice(b, x, p["start_indices"], p["limit_indices"], steps, eqn.outvars[0].aval)
    ]


@handles("rev")
def _rev(b, eqn, ins):
    (x,) = ins
    dims = eqn.params["dimensions"]
    starts = [-1 if a in dims else 0 for a in range(len(x.shape))]
    limits = [-INT64_MAX if a in dims else x.shape[a] for a in range(len(x.shape))]
    steps = [-1 if a in dims else 1 for a in range(len(x.shape))]
    return [_slice(b, x, starts, limits, steps, eqn.outvars[0].aval)]


@handles("dynamic_slice")
def _dynamic_slice(b, eqn, ins):
    x, *starts = ins
    if not all(s.is_const for s in starts):
        raise UnsupportedPrimitive("dynamic_slice with computed start indices")
    begin = [int(s.const) for s in starts]
    sizes = eqn.params["slice_sizes"]
    limits = [s + n for s, n in zip(begin, sizes, strict=True)]
    return [_slice(b, x, begin, limits, (1,) * len(sizes), eqn.outvars[0].aval)]


@handles("gather")
def _gather(b, eqn, ins):
    x, indices = ins
    dn = eqn.params["dimension_numbers"]
    aval = eqn.outvars[0].aval
    if dn.operand_batching_dims:
        return [_take_along_axis(b, x, indices, dn, aval)]
    if len(indices.shape) == 1:
        return [_block_gather(b, x, indices, eqn.params, aval)]
    return [_gather_nd(b, x, indices, dn, eqn.params["slice_sizes"], aval)]


def _block_gather(b, x, indices, params, aval) -> Tensor:
    """A gather of one block (`x[start:]`, `x[..., i]`): a Slice and a Squeeze."""
    dn = params["dimension_numbers"]
    sizes = params["slice_sizes"]
    block_shape = tuple(sizes)
    block_aval = (
        jax.ShapeDtypeStruct(block_shape, aval.dtype)
        if _static_shape(block_shape)
        else None
    )
    if indices.is_const:
        begin = [0] * len(x.shape)
        for axis, start in zip(dn.start_index_map, indices.const, strict=True):
            begin[axis] = int(start)
        limits = [s + n for s, n in zip(begin, sizes, strict=True)]
        block = _slice(b, x, begin, limits, (1,) * len(begin), block_aval or aval)
    else:
        axes = list(dn.start_index_map)
        starts = b.op("Cast", b.name_of(indices, full=True), to=onnx.TensorProto.INT64)
        ends = b.op("Add", starts, b.dims([sizes[a] for a in axes]))
        physical = b.ints([x.perm.index(a) for a in axes])
        name = b.op("Slice", b.name_of(x, full=True), starts, ends, physical)
        block = _out(block_aval or aval, name, x.perm)
    collapsed = tuple(dn.collapsed_slice_dims)
    if not collapsed:
        return Tensor(tuple(aval.shape), block.dtype, name=block.name, perm=block.perm)
    physical = b.ints([block.perm.index(a) for a in collapsed])
    name = b.op("Squeeze", block.name, physical)
    return _out(aval, name, _renumber_after_removing(block.perm, collapsed))


def _take_along_axis(b, x, indices, dn, aval) -> Tensor:
    """`jnp.take_along_axis` (a gather batched over the other axes): GatherElements."""
    rank = len(x.shape)
    (axis,) = dn.start_index_map
    others = tuple(a for a in range(rank) if a != axis)
    if (
        tuple(dn.collapsed_slice_dims) != (axis,)
        or tuple(dn.operand_batching_dims) != others
        or tuple(dn.start_indices_batching_dims) != others
        or dn.offset_dims
        or len(indices.shape) != rank + 1
    ):
        raise UnsupportedPrimitive(f"gather of this form: {dn}")
    identity = tuple(range(rank + 1))
    index = b.op("Squeeze", b.name_of(indices, identity, full=True), b.ints([rank]))
    index = b.op("Cast", index, to=onnx.TensorProto.INT64)
    data = b.name_of(x, tuple(range(rank)), full=True)
    return _out(aval, b.op("GatherElements", data, index, axis=axis))


def _gather_nd(b, x, indices, dn, slice_sizes, aval) -> Tensor:
    """`x[i0, i1, ...]` with an index vector on the last axis: ONNX GatherND."""
    depth = indices.shape[-1]
    leading = tuple(range(depth))
    batch_rank = len(indices.shape) - 1
    if (
        tuple(dn.start_index_map) != leading
        or tuple(dn.collapsed_slice_dims) != leading
        or any(slice_sizes[a] != 1 for a in leading)
        or not _same_dims(tuple(slice_sizes[depth:]), tuple(x.shape[depth:]))
        or tuple(dn.offset_dims) != tuple(range(batch_rank, len(aval.shape)))
    ):
        raise UnsupportedPrimitive(f"gather of this form: {dn}")
    identity = tuple(range(len(x.shape)))
    index = b.op("Cast", b.name_of(indices, full=True), to=onnx.TensorProto.INT64)
    name = b.op("GatherND", b.name_of(x, identity, full=True), index)
    return _out(aval, name)


@handles("iota")
def _iota(b, eqn, ins):
    """An iota over a symbolic shape: a broadcastable constant along its axis."""
    p = eqn.params
    axis, shape = p["dimension"], tuple(p["shape"])
    if not _is_static(shape[axis]):
        raise UnsupportedPrimitive("iota along the batch axis")
    bshape = [1] * len(shape)
    bshape[axis] = shape[axis]
    value = np.arange(shape[axis], dtype=p["dtype"]).reshape(bshape)
    return [Tensor(shape, value.dtype, const=value)]


@handles("dim_as_value")
def _dim_as_value(b, eqn, ins):
    aval = eqn.outvars[0].aval
    value = b.op("Reshape", b.dim(eqn.params["dim"]), b.ints([]))
    return [_out(aval, b.op("Cast", value, to=_onnx_dtype(aval.dtype)))]


# ----------------------------------------------------------------------------
# Reductions, convolutions, matrix products


def _reduction(op: str):
    def handler(b, eqn, ins):
        (x,) = ins
        axes = tuple(eqn.params["axes"])
        physical = [x.perm.index(a) for a in axes]
        name = b.op(op, b.name_of(x, full=True), b.ints(physical), keepdims=0)
        perm = _renumber_after_removing(x.perm, axes)
        return [_out(eqn.outvars[0].aval, name, perm)]

    return handler


for _name, _op in {
    "reduce_sum": "ReduceSum", "reduce_max": "ReduceMax",
    "reduce_min": "ReduceMin", "reduce_prod": "ReduceProd",
}.items():  # fmt: skip
    HANDLERS[_name] = _reduction(_op)


def _arg_reduction(op: str):
    def handler(b, eqn, ins):
        (x,) = ins
        (axis,) = eqn.params["axes"]
        aval = eqn.outvars[0].aval
        name = b.op(op, b.name_of(x, full=True), axis=x.perm.index(axis), keepdims=0)
        name = b.op("Cast", name, to=_onnx_dtype(aval.dtype))
        return [_out(aval, name, _renumber_after_removing(x.perm, (axis,)))]

    return handler


HANDLERS["argmax"] = _arg_reduction("ArgMax")
HANDLERS["argmin"] = _arg_reduction("ArgMin")


@handles("top_k")
def _top_k(b, eqn, ins):
    (x,) = ins
    axis = eqn.params.get("axis", len(x.shape) - 1) % len(x.shape)
    values, indices = b.node(
        "TopK", [b.name_of(x, full=True), b.ints([eqn.params["k"]])], outputs=2,
        axis=x.perm.index(axis), largest=1, sorted=1,
    )  # fmt: skip
    values_aval, indices_aval = (v.aval for v in eqn.outvars)
    indices = b.op("Cast", indices, to=_onnx_dtype(indices_aval.dtype))
    return [_out(values_aval, values, x.perm), _out(indices_aval, indices, x.perm)]


@handles("sort")
def _sort(b, eqn, ins):
    """A stable sort on one key (`jnp.sort`, `jnp.argsort`): TopK of the whole axis.

    TopK puts the lower index first among equal keys, as a stable sort does.
    """
    if eqn.params["num_keys"] != 1:
        raise UnsupportedPrimitive("sort on several keys")
    keys, *others = ins
    axis = eqn.params["dimension"] % len(keys.shape)
    if not _is_static(keys.shape[axis]):
        raise UnsupportedPrimitive("sort along the batch axis")
    identity = tuple(range(len(keys.shape)))
    values, order = b.node(
        "TopK", [b.name_of(keys, identity, full=True), b.ints([keys.shape[axis]])],
        outputs=2, axis=axis, largest=0, sorted=1,
    )  # fmt: skip
    outs = [_out(eqn.outvars[0].aval, values)]
    for t, var in zip(others, eqn.outvars[1:], strict=True):
        data = b.name_of(t, identity, full=True)
        outs.append(_out(var.aval, b.op("GatherElements", data, order, axis=axis)))
    return outs


@handles("reduce_window_max")
def _reduce_window_max(b, eqn, ins):
    (x,) = ins
    p = eqn.params
    spatial = [
        a for a in range(len(x.shape))
        if p["window_dimensions"][a] > 1 or p["window_strides"][a] > 1
        or tuple(p["padding"][a]) != (0, 0)
    ]  # fmt: skip
    other = [a for a in range(len(x.shape)) if a not in spatial]
    if len(other) != 2 or any(d != 1 for d in p["base_dilation"]):
        raise UnsupportedPrimitive("reduce_window_max other than a 2-D max pool")
    perm = tuple(other + spatial)
    name = b.op(
        "MaxPool", b.name_of(x, perm, full=True),
        kernel_shape=[p["window_dimensions"][a] for a in spatial],
        strides=[p["window_strides"][a] for a in spatial],
        pads=[p["padding"][a][0] for a in spatial] + [p["padding"][a][1] for a in spatial],
        dilations=[p["window_dilation"][a] for a in spatial],
    )  # fmt: skip
    return [_out(eqn.outvars[0].aval, name, perm)]


@handles("conv_general_dilated")
def _conv(b, eqn, ins):
    x, kernel = ins
    p = eqn.params
    dn = p["dimension_numbers"]
    if p["batch_group_count"] != 1:
        raise UnsupportedPrimitive("conv_general_dilated with batch_group_count")
    lhs = b.name_of(x, tuple(dn.lhs_spec), full=True)
    weights = kernel.const if kernel.is_const else None
    if weights is None:
        raise UnsupportedPrimitive("a convolution with a computed kernel")
    weights = np.broadcast_to(weights, kernel.shape).transpose(dn.rhs_spec)  # OIHW
    if any(d != 1 for d in p["lhs_dilation"]):
        name = _conv_transpose(b, lhs, weights, p)
    else:
        name = b.op(
            "Conv", lhs, b.constant(np.ascontiguousarray(weights)),
            strides=list(p["window_strides"]),
            pads=[lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]],
            dilations=list(p["rhs_dilation"]), group=p["feature_group_count"],
        )  # fmt: skip
    return [_out(eqn.outvars[0].aval, name, tuple(dn.out_spec))]


def _conv_transpose(b, lhs: str, weights: np.ndarray, p) -> str:
    """A conv of the input dilated by s: ONNX ConvTranspose with stride s.

    ConvTranspose correlates the dilated input, padded by `k - 1 - pad`, with
    the spatially flipped kernel whose in/out channels are swapped.
    """
    if any(d != 1 for d in p["rhs_dilation"]) or p["feature_group_count"] != 1:
        raise UnsupportedPrimitive("a transposed convolution with dilation or groups")
    kernel = weights.shape[2:]
    flipped = np.flip(weights, axis=(2, 3)).transpose(1, 0, 2, 3)
    begins = [k - 1 - lo for k, (lo, _) in zip(kernel, p["padding"], strict=True)]
    ends = [k - 1 - hi for k, (_, hi) in zip(kernel, p["padding"], strict=True)]
    extra = [max(0, -e) for e in ends]
    if min(begins) < 0 or any(
        e >= s for e, s in zip(extra, p["lhs_dilation"], strict=True)
    ):
        raise UnsupportedPrimitive(
            f"a transposed convolution with padding {p['padding']}"
        )
    return b.op(
        "ConvTranspose", lhs, b.constant(np.ascontiguousarray(flipped)),
        strides=list(p["lhs_dilation"]), pads=begins + [max(e, 0) for e in ends],
        output_padding=extra,
    )  # fmt: skip


@handles("dot_general")
def _dot_general(b, eqn, ins):
    lhs, rhs = ins
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lf = [a for a in range(len(lhs.shape)) if a not in lc and a not in lb]
    rf = [a for a in range(len(rhs.shape)) if a not in rc and a not in rb]
    batch = [lhs.shape[a] for a in lb]
    left = _matrix(b, lhs, list(lb) + lf + list(lc), batch, [lhs.shape[a] for a in lf],
                   [lhs.shape[a] for a in lc])  # fmt: skip
    right = _matrix(b, rhs, list(rb) + list(rc) + rf, batch, [rhs.shape[a] for a in rc],
                    [rhs.shape[a] for a in rf])  # fmt: skip
    name = b.op("MatMul", left, right)
    aval = eqn.outvars[0].aval
    if len(lf) != 1 or len(rf) != 1:
        name = b.op("Reshape", name, b.reshape_target(aval.shape))
    if np.dtype(aval.dtype) != np.result_type(lhs.dtype, rhs.dtype):
        name = b.op("Cast", name, to=_onnx_dtype(aval.dtype))
    return [_out(aval, name)]


def _matrix(b, t: Tensor, order, batch, rows, cols) -> str:
    """`t` with logical axes `order` as a [*batch, prod(rows), prod(cols)] matrix."""
    target = [*batch, _product(rows), _product(cols)]
    if t.is_const:
        value = np.broadcast_to(t.const, t.shape).transpose(order)
        return b.constant(np.ascontiguousarray(value.reshape([int(d) for d in target])))
    name = b.name_of(t, tuple(order), full=True)
    if len(rows) != 1 or len(cols) != 1:
        name = b.op("Reshape", name, b.reshape_target(target))
    return name


def _product(dims):
    return math.prod(dims) if _static_shape(dims) else dims[0] * math.prod(dims[1:])


# ----------------------------------------------------------------------------
# Control flow


@handles("platform_index")
def _platform_index(b, eqn, ins):
    """The exported graph takes XLA's native (default) branch, not the CPU kernels."""
    platforms = eqn.params["platforms"]
    if None not in platforms:
        raise UnsupportedPrimitive(f"platform_dependent without a default: {platforms}")
    return [_const(np.int32(platforms.index(None)), eqn.outvars[0].aval)]


@handles("cond")
def _cond(b, eqn, ins):
    index, *operands = ins
    if not index.is_const:
        raise UnsupportedPrimitive("cond on a computed predicate")
    branches = eqn.params["branches"]
    chosen = int(np.clip(index.const, 0, len(branches) - 1))
    return convert_closed(b, branches[chosen], operands)


@handles("scan")
def _scan(b, eqn, ins):
    """`lax.scan` as an ONNX Loop (OpenVINO nests Loops, not Scans)."""
    p = eqn.params
    if p["reverse"]:
        raise UnsupportedPrimitive("a reversed scan")
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    consts, carry = ins[:n_consts], ins[n_consts : n_consts + n_carry]
    xs = ins[n_consts + n_carry :]
    graph = _loop_body(b, p["jaxpr"], consts, n_carry, xs)
    initial = [b.name_of(t, tuple(range(len(t.shape))), full=True) for t in carry]
    trip_count = b.op("Reshape", b.dim(p["length"]), b.ints([]))
    names = b.node(
        "Loop", [trip_count, "", *initial], outputs=len(eqn.outvars), body=graph
    )
    return [_out(v.aval, n) for n, v in zip(names, eqn.outvars, strict=True)]


def _loop_body(b, closed, consts, n_carry: int, xs) -> onnx.GraphProto:
    """`(step, condition, *carry) -> (condition, *carry, *ys)` of a scan's body.

    The body reads the scan's constants from the outer graph by name and takes
    step i of each scanned input with a Gather.
    """
    body = GraphBuilder(root=b.root)
    step, condition = body.fresh("step"), body.fresh("condition")
    invars = closed.jaxpr.invars[len(consts) : len(consts) + n_carry]
    carry_in = [_graph_input(body, v.aval, "carry") for v in invars]
    xs_in = []
    for x in xs:
        outer = b.name_of(x, tuple(range(len(x.shape))), full=True)
        aval = jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
        xs_in.append(_out(aval, body.op("Gather", outer, step, axis=0)))
    outs = convert_closed(body, closed, consts + [t for t, _ in carry_in] + xs_in)
    out_names = [
        body.op("Identity", body.name_of(o, tuple(range(len(o.shape))), full=True))
        for o in outs
    ]
    flags = [
        helper.make_tensor_value_info(step, onnx.TensorProto.INT64, []),
        helper.make_tensor_value_info(condition, onnx.TensorProto.BOOL, []),
    ]
    condition_out = helper.make_tensor_value_info(
        body.op("Identity", condition), onnx.TensorProto.BOOL, []
    )
    outputs = [
        _value_info(n, v.aval)
        for n, v in zip(out_names, closed.jaxpr.outvars, strict=True)
    ]
    return helper.make_graph(
        body.nodes, body.fresh("loop_body"), flags + [i for _, i in carry_in],
        [condition_out, *outputs],
    )  # fmt: skip


def _graph_input(b: GraphBuilder, aval, hint: str):
    name = b.fresh(hint)
    return _out(aval, name), _value_info(name, aval)


def _value_info(name: str, aval, dim_param=None) -> onnx.ValueInfoProto:
    shape = [int(d) if _is_static(d) else dim_param for d in aval.shape]
    return helper.make_tensor_value_info(name, _onnx_dtype(aval.dtype), shape)


# ----------------------------------------------------------------------------
# The model


def convert(
    fn, spec: jax.ShapeDtypeStruct, output_names: Sequence[str]
) -> onnx.ModelProto:
    """The ONNX model of `fn(images)` for inputs like `spec` (batch symbolic).

    Args:
      fn: a jax function of one array; its variables are closed over.
      spec: the input's shape (first dimension symbolic) and dtype.
      output_names: a name for each output of `fn`.
    """
    if onnx is None:
        raise ImportError("the ONNX export needs pip install 'recontrast_jax[onnx]'")
    closed = jax.make_jaxpr(fn)(spec)
    b = GraphBuilder()
    b.batch_symbol = _batch_symbol(spec.shape[0])
    b.batch_tensor = b.op("Shape", "images", start=0, end=1)
    images = Tensor(tuple(spec.shape), np.dtype(spec.dtype), name="images")
    outs = convert_closed(b, closed, [images])
    outputs = []
    for name, t, var in zip(output_names, outs, closed.jaxpr.outvars, strict=True):
        identity = tuple(range(len(t.shape)))
        b.nodes.append(
            helper.make_node("Identity", [b.name_of(t, identity, full=True)], [name])
        )
        outputs.append(_value_info(name, var.aval, dim_param=BATCH_DIM))
    graph = helper.make_graph(
        b.nodes, "predict", [_value_info("images", spec, dim_param=BATCH_DIM)],
        outputs, b.initializers,
    )  # fmt: skip
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="recontrast_jax",
    )
    fold_affine_into_conv(model.graph)
    remove_unused_initializers(model.graph)
    return model


def _batch_symbol(dim) -> str:
    (symbol,) = dim._get_vars()
    return symbol


# ----------------------------------------------------------------------------
# Graph passes


def _subgraphs(node: onnx.NodeProto):
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        yield from attribute.graphs


def _uses(graph: onnx.GraphProto, counts: dict[str, int]) -> dict[str, int]:
    """How often each tensor name is read, inside Loop bodies included."""
    for node in graph.node:
        for name in node.input:
            counts[name] = counts.get(name, 0) + 1
        for sub in _subgraphs(node):
            _uses(sub, counts)
    for output in graph.output:
        counts[output.name] = counts.get(output.name, 0) + 1
    return counts


def _per_channel(value: np.ndarray, channels: int) -> np.ndarray | None:
    """`value` as a [channels] vector if it broadcasts along NCHW's channel axis."""
    if value.ndim > 4 or value.ndim == 0:
        return np.broadcast_to(value, (channels,)) if value.ndim == 0 else None
    shape = (1,) * (4 - value.ndim) + value.shape
    if shape[0] != 1 or shape[2] != 1 or shape[3] != 1 or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(shape[1]), (channels,))


def fold_affine_into_conv(graph: onnx.GraphProto) -> None:
    """Folds `conv(x) (+|-|*|/) per-channel constant` chains into the conv.

    BatchNorm in inference is `(y - mean) * (rsqrt(var + eps) * scale) + bias`,
    which leaves the constant folding as a Sub, a Mul and an Add after each
    convolution; folded, the runtime sees one convolution with a bias.
    """
    initializers = {t.name: t for t in graph.initializer}
    changed = True
    while changed:
        changed = False
        uses = _uses(graph, {})
        producers = {out: n for n in graph.node for out in n.output}
        for node in list(graph.node):
            if node.op_type not in ("Add", "Sub", "Mul", "Div"):
                continue
            conv = producers.get(node.input[0])
            if conv is None or conv.op_type not in ("Conv", "ConvTranspose"):
                continue
            if uses.get(node.input[0]) != 1 or node.input[1] not in initializers:
                continue
            if _fold_one(graph, conv, node, initializers):
                changed = True
                break


def _fold_one(graph, conv, node, initializers) -> bool:
    weights = numpy_helper.to_array(initializers[conv.input[1]])
    out_axis = 1 if conv.op_type == "ConvTranspose" else 0
    channels = weights.shape[out_axis] * (1 if out_axis == 0 else _group(conv))
    value = _per_channel(numpy_helper.to_array(initializers[node.input[1]]), channels)
    if value is None:
        return False
    bias = (
        numpy_helper.to_array(initializers[conv.input[2]])
        if len(conv.input) > 2
        else np.zeros(channels, weights.dtype)
    )
    shape = [1] * weights.ndim
    shape[out_axis] = channels
    if node.op_type in ("Mul", "Div"):
        factor = value if node.op_type == "Mul" else 1 / value
        weights, bias = weights * factor.reshape(shape), bias * factor
    else:
        bias = bias + value if node.op_type == "Add" else bias - value
    names = [_add_initializer(graph, initializers, conv.name or conv.output[0], a)
             for a in (weights, bias.astype(weights.dtype))]  # fmt: skip
    del conv.input[1:]
    conv.input.extend(names)
    conv.output[0] = node.output[0]
    graph.node.remove(node)
    return True


def _group(conv) -> int:
    for attribute in conv.attribute:
        if attribute.name == "group":
            return attribute.i
    return 1


def _add_initializer(graph, initializers, hint: str, value: np.ndarray) -> str:
    name = f"{hint}_folded_{len(initializers)}"
    tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
    graph.initializer.append(tensor)
    initializers[name] = tensor
    return name


def remove_unused_initializers(graph: onnx.GraphProto) -> None:
    uses = _uses(graph, {})
    unused = [t for t in graph.initializer if t.name not in uses]
    for tensor in unused:
        graph.initializer.remove(tensor)
