"""Resuming the training input stream mid-epoch."""


def test_start_batch_continues_the_stream_exactly(tiny_dataset):
    import itertools

    import numpy as np

    from recontrast_jax.data import folder, input_pipeline

    samples = folder.scan_category(tiny_dataset, "brick").train  # 6 images
    kwargs = dict(batch_size=4, image_size=16, crop_size=16, seed=3)

    def stream(start):
        ds = input_pipeline.train_dataset(samples, start_batch=start, **kwargs)
        return [
            b["image"] for b in itertools.islice(input_pipeline.iterate_numpy(ds), 5)
        ]

    full = stream(0)
    resumed = stream(3)  # epoch 1, second (partial) batch onwards
    for a, b in zip(full[3:], resumed, strict=False):
        np.testing.assert_array_equal(a, b)
    assert [len(b) for b in full] == [4, 2, 4, 2, 4]
