"""Tests for recontrast_jax.export: the exported model against the in-process path.

The oracle is the training/evaluation path run in this process: PIL resize +
center crop (``input_pipeline.resize_and_crop_uint8``), ``normalize_uint8`` and
``recontrast_method.predict`` on the live state. The artifact instead receives only the
resized uint8 images and must crop, normalise and predict by itself, from its
embedded constants, for any batch size.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from recontrast_jax import default_config, export
from recontrast_jax.data import input_pipeline
from recontrast_jax.methods import recontrast as recontrast_method

IMAGE_SIZE = 40
CROP_SIZE = 32
EXTRA = {"threshold": 0.125, "category": "bottle"}

# One jitted reference shared by all tests, so equal shapes compile once.
_jit_predict = jax.jit(
    recontrast_method.predict,
    static_argnames=("arch", "sigma", "score_rule", "max_ratio"),
)


def _config(image_size=IMAGE_SIZE):
    config = default_config.get_config()
    config.model.arch = "resnet_tiny"
    config.model.pretrained = ""
    config.data.image_size = image_size
    config.data.crop_size = CROP_SIZE
    config.eval.sigma = 2.0
    return config


@pytest.fixture(scope="module")
def state():
    tx = recontrast_method.make_optimizer(_config().optimizer)
    return recontrast_method.create_train_state(
        "resnet_tiny", CROP_SIZE, tx, jax.random.key(0)
    )


@pytest.fixture(scope="module")
def export_dir(state, tmp_path_factory):
    directory = tmp_path_factory.mktemp("export") / "model"
    assert export.export_model(state, _config(), directory, EXTRA) == str(directory)
    return str(directory)


def _raw_images(seed, count):
    """Random uint8 images of assorted sizes (not already at image_size)."""
    rng = np.random.default_rng(seed)
    sizes = [(57, 63), (40, 40), (31, 48), (90, 70)]
    return [
        rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8)
        for i in range(count)
    ]


def _reference(state, config, raw_images):
    """The in-process path: PIL resize + crop, normalize_uint8, predict."""
    size, crop = config.data.image_size, config.data.crop_size
    batch = np.stack(
        [
            input_pipeline.normalize_uint8(
                input_pipeline.resize_and_crop_uint8(image, size, crop)
            )
            for image in raw_images
        ]
    )
    maps, scores = _jit_predict(
        state,
        batch,
        arch=config.model.arch,
        sigma=config.eval.sigma,
        score_rule=config.eval.score_rule,
        max_ratio=config.eval.max_ratio,
    )
    return np.asarray(maps), np.asarray(scores)


def _exported_inputs(raw_images, image_size):
    return np.stack(
        [export.preprocess_for_export(image, image_size) for image in raw_images]
    )


def test_preprocess_for_export_is_pil_bilinear_resize():
    for image in _raw_images(seed=3, count=4):
        expected = np.asarray(
            Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        )
        got = export.preprocess_for_export(image, IMAGE_SIZE)
        assert got.dtype == np.uint8 and got.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        np.testing.assert_array_equal(got, expected)


def test_preprocess_for_export_rejects_non_rgb():
    with pytest.raises(ValueError, match="uint8 \\(H, W, 3\\)"):
        export.preprocess_for_export(np.zeros((8, 8), np.uint8), IMAGE_SIZE)


def test_in_model_normalization_is_bit_identical_to_torch_arithmetic():
    images = np.random.default_rng(0).integers(0, 256, (2, 9, 9, 3), dtype=np.uint8)
    mean = np.float32([0.485, 0.456, 0.406])
    std = np.float32([0.229, 0.224, 0.225])
    # ToTensor then Normalize, step by step in float32.
    expected = (images.astype(np.float32) / np.float32(255) - mean) / std
    got = np.asarray(jax.jit(export._normalize)(images))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("batch_size", [2, 3])
def test_exported_model_matches_in_process_path(state, export_dir, batch_size):
    predict, _ = export.load_exported(export_dir)
    raw = _raw_images(seed=batch_size, count=batch_size)
    maps, scores = predict(_exported_inputs(raw, IMAGE_SIZE))
    ref_maps, ref_scores = _reference(state, _config(), raw)
    assert maps.shape == (batch_size, CROP_SIZE, CROP_SIZE)
    assert scores.shape == (batch_size,)
    assert maps.dtype == np.float32 and scores.dtype == np.float32
    # The maps must depend on the image, or the comparison would prove nothing.
    assert np.ptp(ref_scores) > 0
    np.testing.assert_allclose(maps, ref_maps, rtol=0, atol=1e-5)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)


def test_odd_crop_margin_uses_torchvision_rounding(state, tmp_path):
    # (43 - 32) / 2 = 5.5, which torchvision rounds half to even: offset 6.
    config = _config(image_size=43)
    directory = export.export_model(state, config, tmp_path, saved_model=False)
    predict, metadata = export.load_exported(directory)
    assert metadata["saved_model"] is False
    assert not os.path.exists(os.path.join(directory, export.SAVED_MODEL_DIR))
    raw = _raw_images(seed=7, count=2)
    maps, scores = predict(_exported_inputs(raw, 43))
    ref_maps, ref_scores = _reference(state, config, raw)
    np.testing.assert_allclose(maps, ref_maps, rtol=0, atol=1e-5)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)


def test_saved_model_matches_in_process_path(state, export_dir):
    _, metadata = export.load_exported(export_dir)
    if not metadata["saved_model"]:
        pytest.skip("export_model could not write a TensorFlow SavedModel")
    import tensorflow as tf

    loaded = tf.saved_model.load(os.path.join(export_dir, export.SAVED_MODEL_DIR))
    serve = loaded.signatures["serving_default"]
    for batch_size in (2, 3):
        raw = _raw_images(seed=10 + batch_size, count=batch_size)
        outputs = serve(images=tf.constant(_exported_inputs(raw, IMAGE_SIZE)))
        ref_maps, ref_scores = _reference(state, _config(), raw)
        np.testing.assert_allclose(outputs["maps"].numpy(), ref_maps, atol=1e-4)
        np.testing.assert_allclose(outputs["scores"].numpy(), ref_scores, atol=1e-4)


def test_metadata_round_trip(export_dir):
    _, metadata = export.load_exported(export_dir)
    config = _config()
    with open(os.path.join(export_dir, export.METADATA_FILE), encoding="utf-8") as f:
        on_disk = json.load(f)
    assert metadata == on_disk
    expected = {
        "format_version": export.FORMAT_VERSION,
        "image_size": IMAGE_SIZE,
        "crop_size": CROP_SIZE,
        "arch": "resnet_tiny",
        "score_rule": config.eval.score_rule,
        "sigma": 2.0,
        "max_ratio": config.eval.max_ratio,
        **EXTRA,
    }
    assert {k: metadata[k] for k in expected} == expected
    assert "uint8" in metadata["input"]


def test_extra_metadata_cannot_overwrite_standard_keys(state, tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        export.export_model(state, _config(), tmp_path, {"image_size": 7})


def test_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        export.load_exported(missing)


def test_missing_file_names_the_path(tmp_path):
    (tmp_path / export.METADATA_FILE).write_text("{}")
    with pytest.raises(FileNotFoundError, match=export.EXPORT_FILE):
        export.load_exported(tmp_path)


def test_wrong_input_shape_is_rejected(export_dir):
    predict, _ = export.load_exported(export_dir)
    with pytest.raises(ValueError, match="preprocess_for_export"):
        predict(np.zeros((1, CROP_SIZE, CROP_SIZE, 3), np.uint8))


def test_without_the_onnx_extra_the_export_skips_model_onnx(
    state, tmp_path, monkeypatch, capsys
):
    from recontrast_jax import console, onnx_export

    monkeypatch.setattr(onnx_export, "onnx", None)
    console.start_run()
    directory = export.export_model(state, _config(), tmp_path, saved_model=False)
    assert not os.path.exists(os.path.join(directory, export.ONNX_FILE))
    with open(os.path.join(directory, export.METADATA_FILE)) as f:
        assert json.load(f)["onnx"] is False
    assert "pip install 'recontrast_jax[onnx]'" in capsys.readouterr().err
    predict, _ = export.load_exported(directory)  # the jax.export artifact is whole
    assert predict(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))[0].shape == (
        1,
        CROP_SIZE,
        CROP_SIZE,
    )
