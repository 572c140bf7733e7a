"""Device prefetching keeps every batch, in order, unchanged."""

import numpy as np

from recontrast_jax import parallel


def test_prefetch_yields_every_batch_in_order():
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    local = [{"image": rng.normal(size=(2, 3)).astype(np.float32),
              "index": np.arange(2, dtype=np.int32) + 2 * i} for i in range(5)]  # fmt: skip
    for size in (1, 2, 3, 7):
        out = list(parallel.prefetch_to_device(mesh, iter(local), size=size))
        assert len(out) == 5
        for got, want in zip(out, local, strict=True):
            np.testing.assert_array_equal(np.asarray(got["image"]), want["image"])
            np.testing.assert_array_equal(np.asarray(got["index"]), want["index"])
