"""PatchCore baseline: kNN scores against a brute-force oracle, end-to-end run."""

import json

import jax
import numpy as np
from scipy.spatial.distance import cdist

from recontrast_jax import default_config, patchcore, train
from recontrast_jax.data import folder, input_pipeline


def tiny_config(root):
    config = default_config.get_config()
    config.method = "patchcore"
    config.model.arch = "resnet_tiny"
    config.model.pretrained = ""
    config.data.root = str(root)
    config.data.categories = ("brick",)
    config.data.image_size = config.data.crop_size = 32
    config.eval.batch_size = 4
    config.patchcore.pretrain_dim = 48
    config.patchcore.target_dim = 40
    config.patchcore.coreset_ratio = 0.25
    config.report.num_heatmaps = 2
    return config


def test_scores_equal_brute_force_nearest_neighbours(tiny_dataset):
    config = tiny_config(tiny_dataset)
    files = folder.scan_category(tiny_dataset, "brick")
    variables = patchcore.encoder_variables(config, jax.random.key(0))

    def features(samples):
        ds = input_pipeline.eval_dataset(
            samples, batch_size=4, image_size=32, crop_size=32
        )
        out = [
            np.asarray(patchcore._features(variables, b["image"], config))[b["valid"]]
            for b in input_pipeline.iterate_numpy(ds)
        ]
        return np.concatenate(out)

    bank = features(files.train).reshape(-1, 40)
    test = features(files.test)  # [N, patches, 40]
    result = patchcore.score_split(
        variables, jax.numpy.asarray(bank), files.test, config
    )
    expected = np.stack([cdist(t, bank).min(axis=1).max() for t in test])
    np.testing.assert_allclose(result.scores, expected, rtol=1e-4, atol=1e-4)
    assert result.maps.shape == (len(files.test), 32, 32)


def test_patchcore_end_to_end(tmp_path, tiny_dataset):
    config = tiny_config(tiny_dataset)
    workdir = tmp_path / "work"
    train.train_and_evaluate(config, str(workdir))
    metrics = json.loads((workdir / "metrics.json").read_text())["categories"]["brick"]
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and 0.0 <= metrics["aupro"] <= 1.0
    bank = np.load(workdir / "memory_bank" / "brick.npy")
    # 25% of the patches of the 5 training images (one of 6 is held out); a 32 px
    # image has a 4x4 grid of layer2 (stride 8) patches.
    assert bank.shape == (int(5 * 16 * 0.25), 40)
    assert (workdir / "heatmaps" / "brick" / "index.html").exists()
    assert (workdir / "calibration" / "brick.json").exists()
