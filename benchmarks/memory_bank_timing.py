"""Times the memory bank at PatchCore/ReConPatch scale: coreset, kNN, ReConPatch step.

Synthetic features (Gaussian, float32) stand in for patch features; the work
done does not depend on their values. Each measurement runs in a fresh
subprocess so that its peak resident memory (`ru_maxrss`) is its own.

* coreset: approximate greedy coreset (128-d projection, 10 starts) of
  N x D features at the given ratio, e.g. 200,000 x 1024 at 1%;
* kNN: 1-NN of one 224-px image's 784 patches against the resulting bank;
* step: one ReConPatch training step on a batch of 1024 patches (f 1024->512,
  g 512->128), after compilation.

Usage:  python benchmarks/memory_bank_timing.py [--n 200000] [--dim 1024] [--ratio 0.01]

Prints a table (compile excluded from the times, included in the peak memory);
asserts nothing.
"""

import argparse
import textwrap

import fresh_process

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import jax, jax.numpy as jnp, numpy as np
    from recontrast_jax import default_config
    from recontrast_jax.methods import memory_bank, reconpatch

    what, n, dim, ratio = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    rng = np.random.default_rng(0)

    def timed(fn, repeats=1):
        jax.block_until_ready(fn())  # compile (and warm up)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best = min(best, time.perf_counter() - start)
        return best

    if what == "coreset":
        features = jnp.asarray(rng.normal(size=(n, dim)).astype(np.float32))
        key = jax.random.key(0)
        seconds = timed(lambda: memory_bank.approximate_greedy_coreset(features, ratio, key))
        detail = f"{memory_bank.coreset_size(n, ratio)} of {n} x {dim}"
    elif what == "knn":
        bank = jnp.asarray(rng.normal(size=(memory_bank.coreset_size(n, ratio), dim)).astype(np.float32))
        queries = jnp.asarray(rng.normal(size=(784, dim)).astype(np.float32))
        seconds = timed(lambda: memory_bank.nearest_neighbors(queries, bank, k=1), 5)
        detail = f"784 queries vs bank {bank.shape[0]} x {dim}"
    else:
        config = default_config.get_config()
        cfg = config.reconpatch
        tx = reconpatch.make_optimizer(cfg, 100)
        state = reconpatch.init_state(cfg, dim, tx, jax.random.key(0))
        patches = jnp.asarray(rng.normal(size=(cfg.batch_size, dim)).astype(np.float32))
        step = jax.jit(lambda s, p: reconpatch.train_step(s, p, cfg=cfg, tx=tx))
        seconds = timed(lambda: step(state, patches)[1]["loss"], 5)
        detail = f"batch {cfg.batch_size}, f {dim}->{cfg.feature_dim}, g ->{cfg.projection_dim}"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(json.dumps({"what": what, "seconds": seconds, "peak_gib": peak, "detail": detail}))
    """
)


def run(what: str, args) -> dict:
    return fresh_process.run_json(CHILD, what, args.n, args.dim, args.ratio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--ratio", type=float, default=0.01)
    args = parser.parse_args()
    print("| what | size | time | peak RSS |")
    print("|---|---|---:|---:|")
    for what in ("coreset", "knn", "step"):
        r = run(what, args)
        print(
            f"| {r['what']} | {r['detail']} | {r['seconds']:.3f} s | {r['peak_gib']:.2f} GiB |"
        )


if __name__ == "__main__":
    main()
