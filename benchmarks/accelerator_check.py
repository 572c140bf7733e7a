"""Accelerator check: ReContrast's paper-setting train step and inference on a GPU/TPU.

One command, on a machine with the JAX stack only (jax, flax, optax, orbax;
ml_collections as a small carried wheel; no TensorFlow, no TFDS):

  python benchmarks/accelerator_check.py [--steps 5] [--batch 16]

On a machine whose JAX sees only CPUs it prints "no accelerator" and exits 0.
Otherwise it prints the device and, each in a fresh process (so the peak
device memory is its own), for float32 and bfloat16 compute:

* the train step (`recontrast_steps.compile_train_step`, wide_resnet50_2,
  256 px, batch 16, the frozen encoder run in the step, state donated);
* inference (`recontrast_steps.compile_predict`, batch 16);

with compile seconds, seconds per step (median), images/s, peak device memory
and FLOP utilisation: XLA's FLOP count of the compiled program over the step
time, against the chip's dense peak for that dtype (datasheet figures, below).
Float32 on NVIDIA GPUs runs as TF32 under JAX's default precision, so float32
is compared with the TF32 peak.

Then it checks that XLA's native convolutions (what the accelerator runs) and
the CPU matmul kernels (what the CPU runs, `models/layers.py`) agree on the
same inputs: the same state and images through predict and one train step
(plain SGD, so the parameter change is the gradient) on the accelerator and
on the host CPU, at float32 with the highest matmul precision.

`--smoke` runs everything on a tiny model at 32 px, on any platform (the
tests use it on the CPU). Asserts nothing about speed.
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import fresh_process
import jax
import numpy as np
import optax

from recontrast_jax import parallel
from recontrast_jax.methods import recontrast_steps

HERE = os.path.dirname(os.path.abspath(__file__))
PAPER_CONFIG = os.path.join(os.path.dirname(HERE), "configs", "mvtec.py")

# Dense peak FLOP/s per chip by device-kind substring: (bfloat16, float32 as run).
PEAK_FLOPS = {
    "H200": (989e12, 495e12),
    "H100": (989e12, 495e12),
    "A100": (312e12, 156e12),
    "L4": (121e12, 60e12),
    "A10": (125e12, 62.5e12),
    "T4": (65e12, 8.1e12),
    "TPU v6": (918e12, 918e12 / 3),
    "TPU v5 lite": (197e12, 197e12 / 3),
    "TPU v5": (459e12, 459e12 / 3),
    "TPU v4": (275e12, 275e12 / 3),
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The datasheet peak for the chip and dtype, or None if the chip is unknown."""
    for name, (bf16, f32) in PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else f32
    return None


def check_config(smoke: bool, dtype: str):
    """configs/mvtec.py (bottle: encoder BatchNorm in train mode), random init."""
    spec = importlib.util.spec_from_file_location("paper_config", PAPER_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("bottle")
    config.model.pretrained = ""
    config.model.dtype = dtype
    if smoke:
        config.model.arch = "resnet_tiny"
        config.data.image_size = config.data.crop_size = 32
    return config


def train_state(config, tx, mesh):
    state = recontrast_steps.create_train_state(
        config.model.arch, config.data.crop_size, tx, jax.random.key(0), ""
    )
    return parallel.replicate(mesh, state)


def random_images(config, batch: int, mesh, seed: int = 0) -> jax.Array:
    side = config.data.crop_size
    images = np.random.default_rng(seed).normal(size=(batch, side, side, 3))
    return jax.device_put(images.astype(np.float32), parallel.batch_sharding(mesh))


def compiled_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


def peak_device_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def measure(kind: str, dtype: str, batch: int, steps: int, smoke: bool) -> dict:
    """Compile and time one setting on the default backend (run in a child)."""
    config = check_config(smoke, dtype)
    mesh = parallel.make_mesh()
    tx = recontrast_steps.make_optimizer(config.optimizer)
    state = train_state(config, tx, mesh)
    images = random_images(config, batch, mesh)
    if kind == "train":
        fn = recontrast_steps.compile_train_step(config, tx, mesh, encoder_train=True)
    else:
        fn = recontrast_steps.compile_predict(config, mesh)
    start = time.perf_counter()
    compiled = fn.lower(state, images).compile()
    compile_s = time.perf_counter() - start

    def run(state):
        out = compiled(state, images)
        jax.block_until_ready(out)
        return out[0] if kind == "train" else state

    state = run(state)  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state = run(state)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    flops = compiled_flops(compiled)
    peak = peak_flops(jax.devices()[0].device_kind, dtype)
    memory = peak_device_bytes()
    return {
        "kind": kind,
        "dtype": dtype,
        "batch": batch,
        "compile_s": compile_s,
        "step_s": seconds,
        "images_per_s": batch / seconds,
        "peak_memory_gib": None if memory is None else memory / 2**30,
        "tflops": flops / seconds / 1e12,
        "utilisation": None if peak is None else flops / seconds / peak,
    }


def on_backend(backend: str, smoke: bool, batch: int) -> dict[str, np.ndarray]:
    """Predict and one SGD train step on one device of `backend`, as host arrays."""
    config = check_config(smoke, "float32")
    mesh = jax.sharding.Mesh(np.array(jax.devices(backend)[:1]), ("data",))
    tx = optax.sgd(1.0)
    state = train_state(config, tx, mesh)
    images = random_images(config, batch, mesh, seed=1)
    maps, scores = recontrast_steps.compile_predict(config, mesh)(state, images)
    params = jax.device_get(state.params)
    step = recontrast_steps.compile_train_step(config, tx, mesh, encoder_train=True)
    new_state, metrics = step(state, images)
    gradient = jax.tree.map(np.subtract, params, jax.device_get(new_state.params))
    return {
        "maps": np.asarray(maps),
        "scores": np.asarray(scores),
        "loss": np.asarray(metrics["loss"]),
        "gradient": np.concatenate([g.ravel() for g in jax.tree.leaves(gradient)]),
    }


def parity(smoke: bool) -> dict:
    """Largest differences between the accelerator's and the CPU's results."""
    batch = 2
    with jax.default_matmul_precision("highest"):
        accelerator = on_backend(jax.default_backend(), smoke, batch)
        cpu = on_backend("cpu", smoke, batch)
    result = {}
    for name in accelerator:
        a, c = accelerator[name], cpu[name]
        scale = float(np.abs(c).max()) or 1.0
        result[name] = float(np.abs(a - c).max()) / scale
    return result


def child(task: str, *args: str) -> None:
    if task == "parity":
        print(json.dumps(parity(args[0] == "1")))
    else:
        kind, dtype, batch, steps, smoke = args
        print(json.dumps(measure(kind, dtype, int(batch), int(steps), smoke == "1")))


def run_child(*args: object) -> dict:
    code = (
        f"import sys; sys.path.insert(0, {HERE!r}); "
        "import accelerator_check as c; c.child(*sys.argv[1:])"
    )
    return fresh_process.run_json(code, *args)


def device_line() -> str:
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    memory = f", {limit / 2**30:.0f} GiB each" if limit else ""
    return (
        f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}"
        f"{memory}); jax {jax.__version__}"
    )


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| step | dtype | batch | compile s | s/step | images/s | peak GiB | TFLOP/s "
        "| of peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['dtype']} | {r['batch']} | {r['compile_s']:.1f} "
            f"| {r['step_s']:.4f} | {r['images_per_s']:.1f} "
            f"| {fmt(r['peak_memory_gib'], '.2f')} | {r['tflops']:.1f} "
            f"| {fmt(r['utilisation'], '.1%')} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="tiny model, any device")
    args = parser.parse_args()
    if jax.default_backend() == "cpu" and not args.smoke:
        print(
            "no accelerator: JAX sees only CPU devices; install jax[cuda13] or "
            "jax[tpu] (README) to run this check. Nothing was measured."
        )
        return 0
    print(f"device: {device_line()}")
    smoke = int(args.smoke)
    rows = []
    for kind in ("train", "predict"):
        for dtype in ("float32", "bfloat16"):
            rows.append(
                run_child("measure", kind, dtype, args.batch, args.steps, smoke)
            )
            print("json:", json.dumps(rows[-1]), flush=True)
    print("\n".join(table(rows)))
    agreement = run_child("parity", smoke)
    print("json:", json.dumps({"parity": agreement}))
    print(
        "native convolutions vs CPU kernels, largest difference relative to the "
        "largest value: "
        + ", ".join(f"{name} {value:.1e}" for name, value in agreement.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
