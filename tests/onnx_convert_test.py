"""The jaxpr-to-ONNX converter, primitive family by family, against XLA.

Each case converts a small jax function with a symbolic batch and runs the
graph on ONNX Runtime (and, for the loops, OpenVINO) at two batch sizes; the
oracle is the same function jitted by XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime
import pytest

from recontrast_jax import onnx_export, runtimes

openvino = runtimes.import_openvino()


def _spec(*shape, dtype=jnp.float32):
    dims = ", ".join(map(str, shape))
    return jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {dims}"), dtype)


def _run_onnxruntime(model, x):
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"images": x})


def _run_openvino(model, x):
    core = openvino.Core()
    compiled = core.compile_model(
        core.read_model(model.SerializeToString(), b""),
        "CPU",
        {"INFERENCE_PRECISION_HINT": "f32"},
    )
    result = compiled(x)
    return [result[i] for i in range(len(compiled.outputs))]


def _check(fn, spec, runners=(_run_onnxruntime,), batches=(1, 3), rtol=2e-6):
    outputs = jax.eval_shape(fn, jax.ShapeDtypeStruct((1, *spec.shape[1:]), spec.dtype))
    count = len(outputs) if isinstance(outputs, tuple) else 1
    model = onnx_export.convert(fn, spec, [f"out{i}" for i in range(count)])
    rng = np.random.default_rng(0)
    for batch in batches:
        shape = (batch, *spec.shape[1:])
        x = rng.normal(size=shape).astype(spec.dtype)
        expected = jax.jit(fn)(x)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for run in runners:
            actual = run(model, x)
            for a, e in zip(actual, expected, strict=True):
                np.testing.assert_allclose(a, np.asarray(e), rtol=rtol, atol=rtol)
    return model


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_conv_batchnorm_relu_maxpool_fold_into_one_conv():
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(3, 3, 4, 8)).astype(np.float32)
    mean, var = rng.normal(size=8), rng.uniform(0.5, 2, size=8)
    scale, bias = rng.normal(size=8), rng.normal(size=8)

    def fn(x):
        y = jax.lax.conv_general_dilated(
            x, kernel, (2, 2), ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip
        y = (y - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias
        y = jnp.maximum(y, 0.0).astype(jnp.float32)
        return jax.lax.reduce_window(
            y, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
            ((0, 0), (1, 1), (1, 1), (0, 0)),
        )  # fmt: skip

    model = _check(fn, _spec(16, 16, 4), rtol=1e-5)
    ops = _ops(model)
    assert ops.count("Conv") == 1 and not {"Sub", "Mul", "Add"} & set(ops), ops
    assert "Transpose" in ops  # NHWC in, NCHW inside, NHWC out: two, no more
    assert ops.count("Transpose") == 2


@pytest.mark.parametrize(
    "kernel_size,strides,padding", [(2, 2, "VALID"), (3, 2, "SAME"), (3, 1, "SAME")]
)
def test_transposed_convolutions(kernel_size, strides, padding):
    kernel = np.random.default_rng(2).normal(size=(kernel_size, kernel_size, 4, 6))

    def fn(x):
        return jax.lax.conv_transpose(
            x, kernel.astype(np.float32), (strides, strides), padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip

    _check(fn, _spec(5, 5, 4), rtol=1e-5)


def test_matrix_products_with_batch_and_several_free_axes():
    weights = np.random.default_rng(3).normal(size=(6, 2, 5)).astype(np.float32)

    def fn(x):
        per_pixel = jnp.einsum("bhwc,cdo->bhwdo", x, weights)
        gram = jnp.einsum("bhwc,bhvc->bhwv", x, x)
        return per_pixel, gram

    _check(fn, _spec(3, 4, 6), rtol=1e-5)


def test_sorting_selection_and_gathers():
    def fn(x):
        flat = x.reshape(x.shape[0], -1)
        order = jnp.argsort(flat, axis=1)
        values, indices = jax.lax.top_k(-flat, 3)
        picked = jnp.take_along_axis(flat, order[:, :4], axis=1)
        table = jnp.arange(20.0)[jnp.argmax(flat, axis=1)]
        return order, values, indices, picked, table

    _check(fn, _spec(4, 5))


def test_nested_scans_over_a_symbolic_batch_on_both_runtimes():
    bank = np.random.default_rng(4).normal(size=(12, 5)).astype(np.float32)

    def per_image(rows):
        def merge(best, chunk):
            d = jnp.sum((rows[:, None, :] - chunk[None]) ** 2, axis=-1)
            return jnp.minimum(best, jnp.min(d, axis=1)), jnp.max(d)

        init = jnp.full(rows.shape[0], jnp.inf)
        best, chunk_max = jax.lax.scan(merge, init, bank.reshape(3, 4, 5))
        return best, chunk_max

    def fn(x):
        doubled = jnp.concatenate([x, 2 * x])
        return jax.lax.map(per_image, doubled[x.shape[0] :])

    _check(fn, _spec(7, 5), runners=(_run_onnxruntime, _run_openvino), rtol=1e-5)


def test_an_untranslated_primitive_is_named():
    with pytest.raises(onnx_export.UnsupportedPrimitive, match="'cumsum'"):
        onnx_export.convert(lambda x: jnp.cumsum(x, axis=1), _spec(4), ["out"])
