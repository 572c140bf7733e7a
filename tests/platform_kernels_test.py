"""The CPU matmul kernels and XLA's native convolutions: same numbers, right platform.

`models/layers.py` runs 1x1 convs, strided 3x3 convs and the 2x2 transposed
convs as matmuls on the CPU and as XLA's convolutions elsewhere, chosen when a
program is lowered. Here both paths are compared on every conv shape the models
use (values and gradients), and the ReContrast train step and predict lowered
for `cuda` and `tpu` on this CPU machine are checked to hold native
convolutions and no matmul kernel.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from recontrast_jax import default_config, parallel
from recontrast_jax.methods import recontrast as recontrast_method
from recontrast_jax.models import backbones, densenet, layers, recontrast, resnet

# kind -> (CPU formulation, native formulation), each f(x, kernel, stride).
PATHS = {
    "PointwiseConv": (layers.pointwise_conv_matmul, layers.pointwise_conv_native),
    "Conv3x3": (
        lambda x, k, s: (
            layers.strided_conv3x3(x, k, s) if s > 1 else layers.conv3x3_native(x, k, 1)
        ),
        layers.conv3x3_native,
    ),
    "TransposedConv2x2": (
        lambda x, k, s: layers.transposed_conv2x2_matmul(x, k),
        lambda x, k, s: layers.transposed_conv2x2_native(x, k),
    ),
}
KERNEL_SIDE = {"PointwiseConv": 1, "Conv3x3": 3, "TransposedConv2x2": 2}


@functools.cache
def model_conv_shapes() -> frozenset[tuple[str, int, int, int]]:
    """(kind, in channels, out channels, stride) of every custom conv the models run."""
    seen = set()

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and type(module).__name__ in PATHS:
            stride = getattr(module, "stride", 2)
            seen.add(
                (type(module).__name__, args[0].shape[-1], module.features, stride)
            )
        return next_fun(*args, **kwargs)

    image = jnp.zeros((1, 64, 64, 3))
    with nn.intercept_methods(record):
        for arch in resnet.ARCHS:  # the module itself: a jit cache hit traces nothing
            model = recontrast.ReContrast(arch)
            jax.eval_shape(
                lambda r, m=model: m.init(
                    r, image, None, train=False, encoder_train=False
                ),
                jax.random.key(0),
            )
        for arch in densenet.DENSENET_ARCHS:
            encoder = backbones.make_encoder(arch)
            jax.eval_shape(
                lambda r, e=encoder: e.init(r, image, train=False), jax.random.key(0)
            )
    return frozenset(seen)


def kernel_shape(kind: str, cin: int, cout: int) -> tuple[int, ...]:
    side = KERNEL_SIDE[kind]
    if kind == "TransposedConv2x2":
        return (side, side, cout, cin)
    return (side, side, cin, cout)


def values_and_gradients(conv, x, kernel, stride, cotangent):
    out, vjp = jax.vjp(lambda a, k: conv(a, k, stride), x, kernel)
    return (out, *vjp(cotangent))


def test_every_model_conv_shape_is_collected():
    shapes = model_conv_shapes()
    kinds = {kind for kind, *_ in shapes}
    assert kinds == set(PATHS)
    # wide_resnet50_2's stride-2 3x3 convs, its 2048-channel 1x1 and the
    # decoder's first transposed conv are among them.
    assert ("Conv3x3", 256, 256, 2) in shapes
    assert ("PointwiseConv", 1024, 2048, 1) in shapes
    assert ("TransposedConv2x2", 2048, 1024, 2) in shapes


@pytest.mark.parametrize("kind", sorted(PATHS))
def test_cpu_kernels_equal_native_convolutions_on_every_model_shape(kind):
    """Outputs and both gradients, float32 tolerance, for each (cin, cout, stride).

    One jitted function per path computes every shape of the kind, so the test
    compiles twice per kind rather than once per shape (one function for all
    kinds compiles several times slower).
    """
    shapes = sorted(s for s in model_conv_shapes() if s[0] == kind)
    rng = np.random.default_rng(0)
    side = 4
    cases = []
    for _, cin, cout, stride in shapes:
        out_side = side * 2 if kind == "TransposedConv2x2" else -(-side // stride)
        kernel = rng.normal(size=kernel_shape(kind, cin, cout)) / np.sqrt(cin)
        cases.append(
            (
                rng.normal(size=(1, side, side, cin)).astype(np.float32),
                kernel.astype(np.float32),
                rng.normal(size=(1, out_side, out_side, cout)).astype(np.float32),
            )
        )

    def run(conv):
        def all_shapes(arrays):
            return [
                values_and_gradients(conv, x, k, stride, g)
                for (_, _, _, stride), (x, k, g) in zip(shapes, arrays, strict=True)
            ]

        return jax.jit(all_shapes)(cases)

    cpu_path, native_path = PATHS[kind]
    matmul, native = run(cpu_path), run(native_path)
    for shape, got, expected in zip(shapes, matmul, native, strict=True):
        names = ("output", "d/dx", "d/dkernel")
        for name, a, b in zip(names, got, expected, strict=True):
            a, b = np.asarray(a), np.asarray(b)
            scale, err = float(np.abs(b).max()), float(np.abs(a - b).max())
            assert err <= 1e-5 * max(scale, 1.0), (shape, name, err, scale)


@pytest.fixture(scope="module")
def tiny_recontrast():
    config = default_config.get_config()
    config.model.arch = "resnet_tiny"
    config.data.image_size = config.data.crop_size = 32
    mesh = parallel.make_mesh()
    tx = recontrast_method.make_optimizer(config.optimizer)
    state = recontrast_method.create_train_state(
        config.model.arch, config.data.crop_size, tx, jax.random.key(0), None
    )
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    return config, mesh, tx, parallel.replicate(mesh, state), images


def op_counts(exported) -> dict[str, int]:
    text = exported.mlir_module()
    return {op: text.count(f"stablehlo.{op}") for op in ("convolution", "dot_general")}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_train_step_and_predict_lower_to_native_convolutions(platform, tiny_recontrast):
    config, mesh, tx, state, images = tiny_recontrast
    step = recontrast_method.compile_train_step(config, tx, mesh, encoder_train=True)
    predict = recontrast_method.compile_predict(config, mesh)
    on_cpu = {
        name: op_counts(export.export(fn, platforms=("cpu",))(state, images))
        for name, fn in (("step", step), ("predict", predict))
    }
    on_platform = {
        name: op_counts(export.export(fn, platforms=(platform,))(state, images))
        for name, fn in (("step", step), ("predict", predict))
    }
    # The train step holds no matmul kernel (dot_general) at all; predict keeps
    # only the map upsampling's, and has one native convolution per conv layer.
    assert on_platform["step"]["dot_general"] == 0, on_platform
    assert on_cpu["step"]["dot_general"] > 0, on_cpu
    assert on_platform["step"]["convolution"] > on_cpu["step"]["convolution"]
    assert on_platform["predict"]["convolution"] == conv_layer_calls(config, state)
    assert on_platform["predict"]["dot_general"] < on_cpu["predict"]["dot_general"]


def conv_layer_calls(config, state) -> int:
    """How many conv layers (of any kind) ReContrast's predict runs."""
    calls = []

    def record(next_fun, args, kwargs, context):
        conv_kinds = (*PATHS, "Conv")
        if context.method_name == "__call__" and type(context.module).__name__ in (
            conv_kinds
        ):
            calls.append(type(context.module).__name__)
        return next_fun(*args, **kwargs)

    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(recontrast_method.configured_predict(config), state, images)
    return len(calls)
