"""Tests for the tf.data pipelines (recontrast_jax.data.input_pipeline).

Oracles: PIL's own resize followed by a float64 numpy transcription of
ToTensor/CenterCrop/Normalize; a naive float implementation of antialiased
bilinear (triangle filter) resampling; and hand-computed crop offsets.
"""

import itertools
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from recontrast_jax.data import folder
from recontrast_jax.data import input_pipeline as ip

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _oracle_preprocess(image, image_size, crop_size):
    """PIL resize, then ToTensor/CenterCrop/Normalize in float64 numpy."""
    resized = Image.fromarray(image).resize((image_size, image_size), Image.BILINEAR)
    x = np.asarray(resized, np.float64) / 255.0
    top = int(round((image_size - crop_size) / 2.0))
    x = x[top : top + crop_size, top : top + crop_size]
    return (x - MEAN) / STD


def _triangle_weights(in_size, out_size):
    """Antialiased bilinear resampling matrix (out_size, in_size), naively."""
    scale = in_size / out_size
    support = max(scale, 1.0)  # The triangle widens by the downscale factor.
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        centre = (i + 0.5) * scale  # In input pixel units; pixel j covers [j, j+1).
        for j in range(in_size):
            weights[i, j] = max(0.0, 1.0 - abs(j + 0.5 - centre) / support)
        weights[i] /= weights[i].sum()
    return weights


def _random_image(seed, h, w):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save_images(directory, images):
    paths = []
    for i, image in enumerate(images):
        path = directory / f"{i:03d}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


# --------------------------------------------------------------------------
# Per-image preprocessing.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,image_size,crop_size",
    [((37, 53), 24, 20), ((37, 53), 24, 17), ((20, 20), 40, 33), ((9, 9), 9, 9)],
)
def test_preprocess_image_matches_pil_and_numpy(shape, image_size, crop_size):
    image = _random_image(0, *shape)
    got = ip.preprocess_image(image, image_size, crop_size)
    assert got.dtype == np.float32 and got.shape == (crop_size, crop_size, 3)
    expected = _oracle_preprocess(image, image_size, crop_size)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)


def test_preprocess_image_resize_is_antialiased_bilinear():
    image = _random_image(1, 40, 60)
    got = ip.preprocess_image(image, 16, 16).astype(np.float64)
    levels = (got * STD + MEAN) * 255.0
    wy, wx = _triangle_weights(40, 16), _triangle_weights(60, 16)
    expected = np.einsum("ij,jkc,lk->ilc", wy, image.astype(np.float64), wx)
    # PIL rounds to uint8 between its two passes: at most one level apart.
    np.testing.assert_allclose(levels, expected, rtol=0, atol=1.01)
    # Without antialiasing, noise would not be smoothed this much.
    assert levels.std() < 0.5 * image.std()


@pytest.mark.parametrize(
    "image_size,crop_size,top",
    # torchvision: int(round((size - crop) / 2.0)), round half to even.
    [(7, 2, 2), (6, 3, 2), (8, 5, 2), (5, 2, 2), (9, 2, 4), (4, 2, 1), (4, 4, 0)],
)
def test_center_crop_window_by_hand(image_size, crop_size, top):
    # image_size equals the source size, so the resize is the identity.
    ramp = np.arange(image_size * image_size * 3) % 251
    image = ramp.reshape(image_size, image_size, 3).astype(np.uint8)
    got = ip.preprocess_image(image, image_size, crop_size)
    for i, j, c in itertools.product(range(crop_size), range(crop_size), range(3)):
        value = int(image[top + i, top + j, c])
        assert got[i, j, c] == pytest.approx((value / 255 - MEAN[c]) / STD[c], abs=1e-6)


def test_normalize_constant_by_hand():
    image = np.full((4, 4, 3), 51, np.uint8)  # 51 / 255 == 0.2
    got = ip.preprocess_image(image, 4, 2)
    expected = [(0.2 - 0.485) / 0.229, (0.2 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
    np.testing.assert_allclose(got, np.broadcast_to(expected, (2, 2, 3)), atol=1e-6)


def test_crop_larger_than_image_is_rejected():
    with pytest.raises(ValueError, match="crop_size"):
        ip.preprocess_image(np.zeros((4, 4, 3), np.uint8), 8, 9)


def test_preprocess_mask_pil_bilinear_then_positive():
    mask = np.zeros((30, 45), np.uint8)
    mask[10:12, 20:21] = 255
    mask[25, 40] = 255
    got = ip.preprocess_mask(mask, 16, 12)
    resized = np.asarray(Image.fromarray(mask).resize((16, 16), Image.BILINEAR))
    expected = resized[2:14, 2:14] > 0
    assert got.dtype == bool and got.shape == (12, 12)
    np.testing.assert_array_equal(got, expected)
    # Downscaling spreads a defect pixel (the reference's slight dilation).
    assert got.sum() >= 2
    assert not ip.preprocess_mask(None, 16, 12).any()
    assert ip.preprocess_mask(None, 16, 12).shape == (12, 12)
    assert ip.preprocess_mask(np.full((5, 5), 255, np.uint8), 8, 8).all()


# --------------------------------------------------------------------------
# Training pipeline.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    directory = tmp_path_factory.mktemp("train")
    images = [_random_image(100 + i, 12, 14) for i in range(10)]
    paths = _save_images(directory, images)
    samples = [folder.Sample(p, None, 0, "good") for p in paths]
    expected = np.stack([_oracle_preprocess(im, 10, 8) for im in images])
    return samples, expected


def _identify(batch, expected):
    """Index of the expected image each batch element equals."""
    dist = np.abs(batch[:, None] - expected[None]).max(axis=(2, 3, 4))
    ids = dist.argmin(axis=1)
    np.testing.assert_array_less(dist[np.arange(len(ids)), ids], 2e-6)
    return ids.tolist()


def _take(dataset, num_batches):
    return list(itertools.islice(ip.iterate_numpy(dataset), num_batches))


def _train(samples, **kwargs):
    args = dict(batch_size=4, image_size=10, crop_size=8, seed=3)
    return ip.train_dataset(samples, **{**args, **kwargs})


@pytest.mark.parametrize(
    "batch_size,multiple,drop,epoch_sizes",
    [
        (4, 1, False, [4, 4, 2]),  # Partial last batch, like drop_last=False.
        (4, 4, False, [4, 4]),  # 2 rounded down to a multiple of 4 is 0: skipped.
        (6, 3, False, [6, 3]),  # 4 rounded down to 3.
        (4, 1, True, [4, 4]),
        (10, 2, False, [10]),
    ],
)
def test_train_batch_sizes(train_set, batch_size, multiple, drop, epoch_sizes):
    samples, expected = train_set
    batches = _take(
        _train(
            samples, batch_size=batch_size, batch_multiple=multiple, drop_remainder=drop
        ),
        3 * len(epoch_sizes),
    )
    assert [b["image"].shape[0] for b in batches] == epoch_sizes * 3
    assert all(b["image"].shape[1:] == (8, 8, 3) for b in batches)
    assert all(b["image"].dtype == np.float32 for b in batches)
    for epoch in range(3):
        epoch_batches = batches[
            epoch * len(epoch_sizes) : (epoch + 1) * len(epoch_sizes)
        ]
        ids = sum((_identify(b["image"], expected) for b in epoch_batches), [])
        assert len(set(ids)) == len(ids) == sum(epoch_sizes)  # No repeats in an epoch.


def test_train_epochs_cover_all_images_reshuffled_and_reproducible(train_set):
    samples, expected = train_set

    def epochs(seed, cache=True, num=3):
        batches = _take(_train(samples, seed=seed, cache=cache), 3 * num)
        ids = [_identify(b["image"], expected) for b in batches]
        return [sum(ids[3 * e : 3 * e + 3], []) for e in range(num)]

    first = epochs(seed=3)
    for order in first:
        assert sorted(order) == list(range(10))
    assert first[0] != first[1] and first[1] != first[2]
    assert first != [list(range(10))] * 3
    assert epochs(seed=3) == first
    assert epochs(seed=3, cache=False) == first
    assert epochs(seed=4) != first


def test_train_images_equal_preprocess_image_bit_for_bit(train_set):
    # The pipeline normalises in TensorFlow; it must match the numpy function
    # (itself checked against the oracle above) exactly, not just closely.
    samples, _ = train_set
    ds = _train(samples, batch_size=10, drop_remainder=True)
    assert ds.element_spec["image"].shape.as_list() == [10, 8, 8, 3]
    images = next(ip.iterate_numpy(ds))["image"]
    expected = [ip.preprocess_image(folder.load_rgb(s.path), 10, 8) for s in samples]
    for image in images:
        assert any(np.array_equal(image, e) for e in expected)


def test_train_multi_process_shards(train_set):
    samples, expected = train_set
    with pytest.raises(ValueError, match="drop_remainder"):
        _train(samples, process_index=0, process_count=2)
    seen = set()
    for index in (0, 1):
        ds = _train(
            samples,
            batch_size=2,
            drop_remainder=True,
            process_index=index,
            process_count=2,
        )
        for batch in _take(ds, 4):
            ids = _identify(batch["image"], expected)
            assert all(i % 2 == index for i in ids)
            seen.update(ids)
    assert seen == set(range(10))


def test_train_argument_errors(train_set):
    samples, _ = train_set
    with pytest.raises(ValueError, match="multiple"):
        _train(samples, batch_size=4, batch_multiple=3)
    with pytest.raises(ValueError, match="no batch"):
        _train(samples[:3], batch_size=4, drop_remainder=True)
    with pytest.raises(ValueError, match="no batch"):
        _train(samples[:3], batch_size=4, batch_multiple=4)


def test_corrupt_training_image_error_names_path(tmp_path, train_set):
    samples, _ = train_set
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    ds = _train(samples[:3] + [folder.Sample(str(bad), None, 0, "good")], cache=False)
    with pytest.raises(folder.DatasetError) as e:
        _take(ds, 2)  # The first epoch touches every image.
    assert str(bad) in str(e.value)


def test_missing_training_image_fails_early(tmp_path, train_set):
    samples, _ = train_set
    missing = str(tmp_path / "missing.png")
    with pytest.raises(folder.DatasetError) as e:
        _train(samples + [folder.Sample(missing, None, 0, "good")])
    assert missing in str(e.value)


# --------------------------------------------------------------------------
# Evaluation pipeline.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    directory = tmp_path_factory.mktemp("eval")
    images = [_random_image(200 + i, 10 + i, 14) for i in range(5)]
    paths = _save_images(directory, images)
    masks = [
        None,
        None,
        np.zeros((11, 14), np.uint8),
        None,
        np.zeros((14, 14), np.uint8),
    ]
    masks[4][3:5, 6:9] = 255  # Sample 2's mask is empty: label 0, as the reference.
    samples = []
    for i, (path, mask) in enumerate(zip(paths, masks, strict=True)):
        mask_path = None
        if mask is not None:
            mask_path = str(directory / f"{i:03d}_mask.png")
            Image.fromarray(mask).save(mask_path)
        samples.append(folder.Sample(path, mask_path, int(mask is not None), "x"))
    expected_images = np.stack([_oracle_preprocess(im, 8, 6) for im in images])
    expected_masks = np.zeros((5, 6, 6), bool)
    for i, mask in enumerate(masks):
        if mask is not None:
            resized = np.asarray(Image.fromarray(mask).resize((8, 8), Image.BILINEAR))
            expected_masks[i] = resized[1:7, 1:7] > 0
    return samples, expected_images, expected_masks


@pytest.mark.parametrize("batch_size,multiple", [(1, 1), (3, 1), (4, 2), (6, 3)])
def test_eval_every_sample_once_in_order_with_padding(eval_set, batch_size, multiple):
    samples, expected_images, expected_masks = eval_set
    ds = ip.eval_dataset(
        samples,
        batch_size=batch_size,
        image_size=8,
        crop_size=6,
        batch_multiple=multiple,
    )
    batches = list(ip.iterate_numpy(ds))
    num_batches = -(-5 // batch_size)
    assert len(batches) == num_batches
    for batch in batches:
        assert batch["image"].shape == (batch_size, 6, 6, 3)
        assert batch["image"].dtype == np.float32
        assert batch["mask"].shape == (batch_size, 6, 6) and batch["mask"].dtype == bool
        assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
    cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    n_pad = num_batches * batch_size - 5
    np.testing.assert_array_equal(cat["valid"], [True] * 5 + [False] * n_pad)
    np.testing.assert_array_equal(cat["index"], list(range(5)) + [-1] * n_pad)
    np.testing.assert_allclose(cat["image"][:5], expected_images, atol=2e-6, rtol=0)
    np.testing.assert_array_equal(cat["mask"][:5], expected_masks)
    np.testing.assert_array_equal(cat["label"][:5], [0, 0, 0, 0, 1])
    assert not cat["image"][5:].any() and not cat["mask"][5:].any()
    assert not cat["label"][5:].any()


def test_eval_cache_gives_same_batches_twice(eval_set):
    samples, expected_images, _ = eval_set
    ds = ip.eval_dataset(samples, batch_size=2, image_size=8, crop_size=6, cache=True)
    for _ in range(2):
        images = np.concatenate([b["image"] for b in ip.iterate_numpy(ds)])[:5]
        np.testing.assert_allclose(images, expected_images, atol=2e-6, rtol=0)


def test_eval_argument_errors(eval_set):
    samples, _, _ = eval_set
    with pytest.raises(ValueError, match="multiple"):
        ip.eval_dataset(
            samples, batch_size=3, image_size=8, crop_size=6, batch_multiple=2
        )
    with pytest.raises(ValueError, match="at least one"):
        ip.eval_dataset([], batch_size=3, image_size=8, crop_size=6)


def test_corrupt_mask_error_names_path(tmp_path, eval_set):
    samples, _, _ = eval_set
    bad = tmp_path / "bad_mask.png"
    bad.write_bytes(b"not a png at all")
    broken = folder.Sample(samples[0].path, str(bad), 1, "x")
    ds = ip.eval_dataset([broken], batch_size=1, image_size=8, crop_size=6)
    with pytest.raises(folder.DatasetError) as e:
        list(ip.iterate_numpy(ds))
    assert str(bad) in str(e.value)


# --------------------------------------------------------------------------
# Shutdown.
# --------------------------------------------------------------------------

_EXIT_SCRIPT = """
import sys
from recontrast_jax.data import folder, input_pipeline as ip
samples = [folder.Sample(p, None, 0, "good") for p in sys.argv[1:]]
kwargs = dict(batch_size=2, image_size=256, crop_size=256, seed=0, cache=False)
raw = iter(ip.train_dataset(samples, **kwargs))
wrapped = ip.iterate_numpy(ip.train_dataset(samples, **kwargs))
next(raw), next(wrapped)
print("exiting with live pipelines", flush=True)
"""


def test_exit_with_live_endless_pipelines_does_not_hang(tmp_path):
    # Python callbacks still in flight when the interpreter finalises used to
    # deadlock the process (their threads wait for the GIL forever); pipelines
    # are stopped at exit instead. Large noise images keep decodes in flight.
    paths = _save_images(tmp_path, [_random_image(i, 384, 384) for i in range(6)])
    result = subprocess.run(
        [sys.executable, "-c", _EXIT_SCRIPT, *paths],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exiting with live pipelines" in result.stdout


def test_numpy_iterator_close_ends_iteration(train_set):
    samples, _ = train_set
    with ip.iterate_numpy(_train(samples)) as iterator:
        assert next(iterator)["image"].shape == (4, 8, 8, 3)
    with pytest.raises(StopIteration):
        next(iterator)
