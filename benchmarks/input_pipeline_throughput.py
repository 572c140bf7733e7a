"""Input pipeline vs train step throughput at the paper setting (256x256).

  python benchmarks/input_pipeline_throughput.py [--arch wide_resnet50_2] [--steps 3]

Writes 48 MVTec-sized (1024x1024 PNG) random-texture images into a temporary
folder, then measures images/s of the training pipeline (first epoch: decode +
resize; later epochs: from the in-memory cache; and with the cache off) and of
the jitted train step at batch 16, on this machine.
"""

import argparse
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from recontrast_jax import default_config, parallel
from recontrast_jax.data import folder, input_pipeline
from recontrast_jax.methods import recontrast

NUM_IMAGES, SOURCE_SIDE, SIZE, BATCH = 48, 1024, 256, 16


def write_images(root):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(NUM_IMAGES):
        low = rng.integers(
            0, 255, (SOURCE_SIDE // 16, SOURCE_SIDE // 16, 3), dtype=np.uint8
        )
        image = Image.fromarray(low).resize((SOURCE_SIDE, SOURCE_SIDE), Image.BICUBIC)
        path = f"{root}/{i:03d}.png"
        image.save(path)
        samples.append(folder.Sample(path, None, 0, "good"))
    return samples


def pipeline_rate(samples, cache, epochs):
    ds = input_pipeline.train_dataset(
        samples, batch_size=BATCH, image_size=SIZE, crop_size=SIZE, seed=0, cache=cache
    )
    iterator = input_pipeline.iterate_numpy(ds)
    per_epoch = NUM_IMAGES // BATCH
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        for _ in range(per_epoch):
            next(iterator)
        rates.append(per_epoch * BATCH / (time.perf_counter() - start))
    iterator.close()
    return rates


def step_rate(arch, steps):
    config = default_config.get_config()
    config.model.arch = arch
    mesh = parallel.make_mesh()
    tx = recontrast.make_optimizer(config.optimizer)
    state = parallel.replicate(
        mesh, recontrast.create_train_state(arch, SIZE, tx, jax.random.key(0))
    )
    step = recontrast.compile_train_step(config, tx, mesh, encoder_train=True)
    images = (
        np.random.default_rng(0).normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)
    )
    batch = parallel.global_batch(mesh, {"image": images})["image"]
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return steps * BATCH / (time.perf_counter() - start), compile_seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="wide_resnet50_2")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        samples = write_images(root)
        cached = pipeline_rate(samples, cache=True, epochs=3)
        uncached = pipeline_rate(samples, cache=False, epochs=2)
    rate, compile_seconds = step_rate(args.arch, args.steps)
    print(
        f"| what ({SIZE}x{SIZE}, batch {BATCH}, {SOURCE_SIDE}px PNG sources) | images/s |"
    )
    print("|---|---:|")
    print(f"| pipeline, first epoch (decode + resize) | {cached[0]:.0f} |")
    print(f"| pipeline, cached epochs | {np.mean(cached[1:]):.0f} |")
    print(f"| pipeline, cache off | {np.mean(uncached[1:]):.0f} |")
    print(f"| train step, {args.arch} (compile {compile_seconds:.0f} s) | {rate:.2f} |")


if __name__ == "__main__":
    main()
