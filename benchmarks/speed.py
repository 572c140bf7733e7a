"""Train-step and inference speed, compile time, memory and FLOP utilisation.

For each setting, in a fresh subprocess (so peak memory is its own):

* ReContrast train step (`methods.recontrast.compile_train_step`, state
  donated): compile time, seconds per step, images/s; also with the frozen
  encoder's features cached (`train.frozen_cache`, the default where they fit);
* ReContrast inference (`methods.recontrast.compile_predict`: encoders,
  decoder, cosine maps, upsampling, blur and score in one jitted function):
  images/s;
* ReConPatch/PatchCore inference (`methods.patchcore.compile_predict`: patch
  features, f, kNN against a 1% bank of the training patches, maps): images/s;
* FLOPs of each compiled function from XLA's cost analysis, divided by its
  measured time, next to the float32 matmul GFLOP/s measured in the same run
  right after that function's timings (a 2048^3 `jnp.dot`, best of 5; on a
  shared virtual machine the rate drifts by tens of percent over minutes): the
  utilisation ratio;
* the bytes each function moves (XLA's "bytes accessed") and the host memory
  bandwidth measured in the same run (a jitted scale-and-add over 256 MB), which
  give the roofline ceiling on utilisation: the matmul-bound time over
  max(matmul-bound time, bandwidth-bound time).

Settings: `quickstart` (resnet_tiny, 96 px, batch 16), `paper` (wide_resnet50_2,
256 px, batch 16 for ReContrast; 224 px for ReConPatch). Random weights and
images: speed does not depend on them.

Usage:  python benchmarks/speed.py [--settings quickstart,paper] [--steps 3]

Prints one markdown table; asserts nothing.
"""

import argparse
import textwrap

import fresh_process

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import jax, jax.numpy as jnp, numpy as np
    from recontrast_jax import default_config, parallel
    from recontrast_jax.methods import memory_bank, patchcore, recontrast
    from recontrast_jax.models import resnet

    setting, steps = sys.argv[1], int(sys.argv[2])
    arch, size, rc_size = {
        "quickstart": ("resnet_tiny", 96, 96),
        "paper": ("wide_resnet50_2", 256, 224),
    }[setting]
    batch = 16
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    rows = []

    def matmul_gflops(n=2048):
        a = jnp.asarray(rng.normal(size=(n, n)).astype(np.float32))
        f = jax.jit(lambda x, y: x @ y)
        f(a, a).block_until_ready()
        best = min(_timed(lambda: f(a, a).block_until_ready()) for _ in range(5))
        return 2 * n**3 / best / 1e9

    def bandwidth_gbs(mb=256):
        a = jnp.ones((mb * 2**20 // 4,), jnp.float32)
        f = jax.jit(lambda x: x * 1.0001 + 1.0)
        f(a).block_until_ready()
        best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(5))
        return 2 * a.nbytes / best / 1e9

    def _timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def measure(name, jitted, args, images, repeats, donate=False):
        start = time.perf_counter()
        compiled = jitted.lower(*args).compile()
        compile_s = time.perf_counter() - start
        cost = compiled.cost_analysis() or {}
        flops = float(cost.get("flops", float("nan")))
        gbytes = float(cost.get("bytes accessed", float("nan"))) / 1e9
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = compiled(*args)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - start)
            if donate:
                args = (out[0],) + tuple(args[1:])
        seconds = float(np.median(times))
        # The matmul rate right after the timings: on a shared host it drifts.
        local_peak = matmul_gflops()
        rows.append(dict(name=name, compile_s=compile_s, seconds=seconds, matmul_gflops=local_peak,
                         images_per_s=images / seconds, gflop=flops / 1e9, gbytes=gbytes,
                         gflops=flops / seconds / 1e9))

    peak_matmul = matmul_gflops()
    bandwidth = bandwidth_gbs()

    # ReContrast train step and inference.
    config = default_config.get_config()
    config.model.arch = arch
    config.data.image_size = config.data.crop_size = size
    tx = recontrast.make_optimizer(config.optimizer)
    state = parallel.replicate(mesh, recontrast.create_train_state(arch, size, tx, jax.random.key(0)))
    images = parallel.global_batch(
        mesh, {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32)})["image"]
    step = recontrast.compile_train_step(config, tx, mesh, encoder_train=True)
    measure(f"ReContrast train step ({arch}, {size} px, batch {batch})",
            step, (state, images), batch, steps, donate=True)
    state = parallel.replicate(mesh, recontrast.create_train_state(arch, size, tx, jax.random.key(0)))
    # Random cached features: the speed of the step does not depend on them.
    cache = parallel.replicate(mesh, [
        np.zeros((batch, size // s, size // s, c), np.float32)
        for s, c in zip((4, 8, 16), resnet.get_arch(arch).stage_channels)])
    index = parallel.global_batch(mesh, {"i": np.arange(batch, dtype=np.int32)})["i"]
    cached = recontrast.compile_train_step(config, tx, mesh, encoder_train=True, cached_features=True)
    measure(f"ReContrast train step, frozen features cached ({arch}, {size} px, batch {batch})",
            cached, (state, images, index, cache), batch, steps, donate=True)
    state = parallel.replicate(mesh, recontrast.create_train_state(arch, size, tx, jax.random.key(0)))
    measure(f"ReContrast inference ({arch}, {size} px)",
            recontrast.compile_predict(config, mesh), (state, images), batch, steps)

    # ReConPatch inference: features, f, kNN against a 1% bank, maps.
    config.method = "reconpatch"
    config.model.pretrained = ""
    config.data.image_size = config.data.crop_size = rc_size
    encoder = patchcore.encoder_variables(config, arch, jax.random.key(0))
    feature_dim, in_dim = config.reconpatch.feature_dim, config.patchcore.target_dim
    bank_rows = memory_bank.coreset_size(200 * (rc_size // 8) ** 2, 0.01)
    model = {
        "encoder": encoder,
        "head": {"f": {
            "kernel": jnp.asarray(rng.normal(size=(in_dim, feature_dim)).astype(np.float32)),
            "bias": jnp.zeros((feature_dim,), jnp.float32)}},
        "bank": jnp.asarray(rng.normal(size=(bank_rows, feature_dim)).astype(np.float32)),
        "normalization": jnp.asarray([0.0, 1.0, 0.0, 1.0], jnp.float32),
    }
    rc_images = parallel.global_batch(
        mesh, {"image": rng.normal(size=(batch, rc_size, rc_size, 3)).astype(np.float32)})["image"]
    measure(f"ReConPatch inference ({arch}, {rc_size} px, bank {bank_rows})",
            patchcore.compile_predict(config, mesh), ([model], rc_images), batch, steps)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(json.dumps(dict(setting=setting, matmul_gflops=peak_matmul,
                     bandwidth_gbs=bandwidth, peak_gib=peak, rows=rows)))
    """
)


def roofline_ceiling(gflop: float, gbytes: float, gflops: float, gbs: float) -> float:
    """Best reachable fraction of the matmul rate when moving `gbytes` at `gbs`."""
    compute_s, memory_s = gflop / gflops, gbytes / gbs
    return compute_s / max(compute_s, memory_s)


def run(setting: str, steps: int) -> dict:
    return fresh_process.run_json(CHILD, setting, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="quickstart,paper")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(
        "| what | compile | time per batch | images/s | GFLOP per batch | GFLOP/s "
        "| matmul GFLOP/s | of matmul | GB moved | roofline ceiling |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for setting in args.settings.split(","):
        result = run(setting, args.steps)
        peak, bandwidth = result["matmul_gflops"], result["bandwidth_gbs"]
        for r in result["rows"]:
            local_peak = r["matmul_gflops"]
            ceiling = roofline_ceiling(r["gflop"], r["gbytes"], local_peak, bandwidth)
            print(
                f"| {r['name']} | {r['compile_s']:.1f} s | {r['seconds']:.3f} s | "
                f"{r['images_per_s']:.1f} | {r['gflop']:.1f} | {r['gflops']:.1f} | "
                f"{local_peak:.0f} | {r['gflops'] / local_peak:.0%} | {r['gbytes']:.1f} "
                f"| {ceiling:.0%} |"
            )
        print(
            f"| ({setting}: float32 matmul {peak:.1f} GFLOP/s at the start, memory "
            f"bandwidth {bandwidth:.1f} GB/s, peak host memory "
            f"{result['peak_gib']:.2f} GiB) | | | | | | | | | |"
        )


if __name__ == "__main__":
    main()
