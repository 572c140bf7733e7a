"""Training tests: state updates, BN modes, the end-to-end run and its outputs."""

import json
import os

import jax
import numpy as np
import pytest

from recontrast_jax import default_config, parallel, run
from recontrast_jax.data import sources
from recontrast_jax.methods import recontrast as recontrast_method

ARCH = "resnet_tiny"


def steps_saved(directory) -> list[str]:
    """The checkpoint step folders (beside them: model_config.json)."""
    return sorted(p for p in os.listdir(directory) if p.isdigit())


def tiny_config(root="", steps=3):
    config = default_config.get_config()
    config.model.arch = ARCH
    config.model.pretrained = ""
    config.data.source = "folder"
    config.data.root = str(root)
    config.data.image_size = 32
    config.data.crop_size = 32
    config.train.steps = steps
    config.train.batch_size = 4
    config.train.log_every = 1
    config.eval.every = steps
    config.eval.batch_size = 4
    config.report.num_heatmaps = 3
    return config


def leaves_equal(a, b):
    return all(
        np.array_equal(x, y)
        for x, y in zip(
            jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True
        )
    )


@pytest.mark.parametrize("encoder_train", [True, False])
def test_step_updates_what_it_should(encoder_train):
    config = tiny_config()
    mesh = parallel.make_mesh()
    tx = recontrast_method.make_optimizer(config.optimizer)
    state = recontrast_method.create_train_state(ARCH, 32, tx, jax.random.key(0))
    before = jax.device_get(state)
    step = recontrast_method.compile_train_step(config, tx, mesh, encoder_train)
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    state = parallel.replicate(mesh, state)
    for _ in range(2):
        state, metrics = step(
            state, parallel.global_batch(mesh, {"image": images})["image"]
        )
    after = jax.device_get(state)
    assert int(after.step) == 2
    assert np.isfinite(float(metrics["loss"]))
    # The frozen encoder never changes; everything trainable does.
    assert leaves_equal(before.frozen, after.frozen)
    for part in ("encoder", "bottleneck", "decoder"):
        assert not leaves_equal(before.params[part], after.params[part]), part
    assert not leaves_equal(before.batch_stats["decoder"], after.batch_stats["decoder"])
    # Encoder running statistics move only when its BatchNorm is in train mode.
    same_encoder_stats = leaves_equal(
        before.batch_stats["encoder"], after.batch_stats["encoder"]
    )
    assert same_encoder_stats != encoder_train


def test_optimizer_groups_use_their_learning_rates():
    config = tiny_config()
    config.optimizer.weight_decay = 0.5
    tx = recontrast_method.make_optimizer(config.optimizer)
    params = {"encoder": np.ones(3), "bottleneck": np.ones(2), "decoder": np.ones(4)}
    grads = {k: np.full_like(v, 0.5) for k, v in params.items()}
    updates, _ = tx.update(grads, tx.init(params), params)
    # First AdamW step (PyTorch): -lr * (g / (|g| + eps) + wd * p) = -lr * 1.5.
    np.testing.assert_allclose(updates["encoder"], -1e-5 * 1.5, rtol=1e-5)
    np.testing.assert_allclose(updates["bottleneck"], -2e-3 * 1.5, rtol=1e-5)
    np.testing.assert_allclose(updates["decoder"], -2e-3 * 1.5, rtol=1e-5)


def test_end_to_end_run_writes_metrics_heatmaps_and_checkpoints(tmp_path, tiny_dataset):
    workdir = tmp_path / "work"
    config = tiny_config(tiny_dataset, steps=3)
    config.data.categories = ("brick", "gravel")
    summary = run.run(config, str(workdir))
    stored = json.loads((workdir / "metrics.json").read_text())
    assert set(stored["categories"]) == {"brick", "gravel"}
    for name in ("image_auroc", "pixel_auroc", "aupro", "aupro_recontrast_per_image"):
        values = [stored["categories"][c][name] for c in ("brick", "gravel")]
        assert all(0.0 <= v <= 1.0 for v in values)
        np.testing.assert_allclose(stored["mean"][name], np.mean(values))
        np.testing.assert_allclose(summary["mean"][name], np.mean(values))
    assert stored["categories"]["brick"]["steps"] == 3
    assert "| **mean** |" in (workdir / "results.md").read_text()
    assert json.loads((workdir / "config.json").read_text())["model"]["arch"] == ARCH
    report = set(os.listdir(workdir / "heatmaps" / "brick"))
    assert {"index.html", "histogram.png"} <= report
    panels = report - {"index.html", "histogram.png"}
    assert len(panels) == 3 and all(p.endswith(".png") for p in panels)
    calibration = json.loads((workdir / "calibration" / "brick.json").read_text())
    assert calibration["normal"]["source"] == "held-out"
    assert (
        len(calibration["normal"]["image_scores"]) == 1
    )  # 10% of 6 images, at least 1
    assert steps_saved(workdir / "checkpoints" / "brick") == ["3"]
    assert os.listdir(workdir / "tensorboard" / "brick")

    # A second run in the same workdir resumes from the final checkpoint:
    # nothing is retrained and the metrics are those of the same weights.
    again = run.run(config, str(workdir))
    assert steps_saved(workdir / "checkpoints" / "brick") == ["3"]
    for c in ("brick", "gravel"):
        assert again["categories"][c]["steps"] == 3
        np.testing.assert_allclose(
            again["categories"][c]["image_auroc"],
            stored["categories"][c]["image_auroc"],
        )


def test_unwritable_workdir_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    target = blocker / "work"
    with pytest.raises(run.WorkdirError, match=str(target)):
        run.prepare_workdir(str(target))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_workdir_is_named(tmp_path):
    workdir = tmp_path / "ro"
    workdir.mkdir()
    workdir.chmod(0o500)
    with pytest.raises(run.WorkdirError, match=str(workdir)):
        run.prepare_workdir(str(workdir))


def test_category_list_accepts_command_line_strings():
    assert sources.category_list("brick, grass,") == ["brick", "grass"]
    assert sources.category_list(("a", "b")) == ["a", "b"]
    assert sources.category_list(()) == []
