"""PatchCore with the reference options against a torch transcription of its code.

The PatchCore reference (spec reconpatch.md section 1) resizes with
torchvision's `Resize(int)` (aspect kept) and `CenterCrop`, counts only mask
pixels that stay exactly 1, moves every BatchNorm's running statistics with one
train-mode forward of a raw all-ones image before extracting features, and
scores with faiss `IndexFlatL2` (squared L2). With `data.resize='shorter_side'`,
`data.mask_rule='exactly_one'`, `patchcore.bn_stats_forward=True` and
`patchcore.distance='squared'`, the project's fitted PatchCore must give that
code's BatchNorm statistics, patch features, image scores, maps and AUROCs.

The oracle is written here from the spec with torch, torchvision, scipy and
sklearn: torchvision resnet18 with random weights and random BatchNorm
statistics (saved to safetensors and loaded by the project), non-square images
in an MVTec-layout folder, and a bank of every training patch (coreset ratio 1,
so the oracle needs no sampler). Runs only when torch and torchvision are
installed.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import jax  # noqa: E402
import scipy.ndimage  # noqa: E402
from backbones_parity_test import numpy_state_dict, randomise_batch_norms  # noqa: E402
from patch_features_test import torch_patch_features  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from torchvision import transforms  # noqa: E402

from recontrast_jax import default_config, evaluate, metrics, parallel  # noqa: E402
from recontrast_jax.data import input_pipeline, sources  # noqa: E402
from recontrast_jax.methods import patchcore  # noqa: E402

RESIZE, CROP = 56, 48
PRETRAIN_DIM, TARGET_DIM = 256, 128
MEAN, STD = input_pipeline.IMAGENET_MEAN, input_pipeline.IMAGENET_STD


# --- Resize(int), CenterCrop and the mask rule --------------------------------


@pytest.mark.parametrize("shape", [(60, 80), (80, 60), (50, 50), (37, 91)])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_shorter_side_resize_equals_torchvision(shape, mode):
    rng = np.random.default_rng(sum(shape))
    channels = (3,) if mode == "RGB" else ()
    image = rng.integers(0, 256, size=shape + channels, dtype=np.uint8)
    expected = transforms.Compose(
        [transforms.Resize(RESIZE - 20), transforms.CenterCrop(CROP - 20)]
    )(Image.fromarray(image))
    got = input_pipeline.resize_and_crop_uint8(
        image, RESIZE - 20, CROP - 20, "shorter_side"
    )
    np.testing.assert_array_equal(got, np.asarray(expected))


def test_exactly_one_mask_rule_equals_to_tensor_astype_int():
    mask = np.zeros((60, 80), np.uint8)
    mask[10:31, 17:52] = 255
    pil_mask = Image.fromarray(mask)
    tensor = transforms.Compose(
        [transforms.Resize(RESIZE), transforms.CenterCrop(CROP), transforms.ToTensor()]
    )(pil_mask)
    expected = tensor.numpy()[0].astype(int).astype(bool)
    got = input_pipeline.preprocess_mask(
        mask, RESIZE, CROP, "shorter_side", "exactly_one"
    )
    np.testing.assert_array_equal(got, expected)
    dilated = input_pipeline.preprocess_mask(mask, RESIZE, CROP, "shorter_side")
    assert dilated.sum() > got.sum()  # 'positive' keeps the blurred border


# --- The whole method -------------------------------------------------------------


def write_folder(root):
    """A non-square MVTec-layout category: 6 train, 2 good and 3 defect test images."""
    rng = np.random.default_rng(0)
    base = root / "part"

    def save(path, array):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    texture = rng.integers(60, 200, size=(60, 80, 3))
    for i in range(6):
        noise = rng.integers(-30, 30, size=texture.shape)
        save(base / "train/good" / f"{i:03d}.png", (texture + noise).astype(np.uint8))
    for i in range(2):
        noise = rng.integers(-30, 30, size=texture.shape)
        save(base / "test/good" / f"{i:03d}.png", (texture + noise).astype(np.uint8))
    for i in range(3):
        image = texture + rng.integers(-30, 30, size=texture.shape)
        mask = np.zeros((60, 80), np.uint8)
        top, left = 8 + 12 * i, 10 + 15 * i
        mask[top : top + 14, left : left + 19] = 255
        image[mask > 0] = rng.integers(0, 256, size=3)
        save(base / "test/crack" / f"{i:03d}.png", image.clip(0, 255).astype(np.uint8))
        save(base / "ground_truth/crack" / f"{i:03d}_mask.png", mask)
    return root


def reference_config(root, weights, bn_stats_forward=True):
    config = default_config.get_config()
    config.method = "patchcore"
    config.data.root = str(root)
    config.data.categories = ("part",)
    config.data.image_size, config.data.crop_size = RESIZE, CROP
    config.data.resize = "shorter_side"
    config.data.mask_rule = "exactly_one"
    config.data.holdout_fraction = 0.0
    config.model.arch = "resnet18"
    config.model.pretrained = str(weights)
    config.eval.batch_size = 4
    config.patchcore.pretrain_dim = PRETRAIN_DIM
    config.patchcore.target_dim = TARGET_DIM
    config.patchcore.coreset_ratio = 1.0
    config.patchcore.distance = "squared"
    config.patchcore.bn_stats_forward = bn_stats_forward
    return config


class Reference:
    """PatchCore's reference pipeline, transcribed in torch (spec section 1)."""

    def __init__(self, model):
        self.model = model
        self.image_transform = transforms.Compose([
            transforms.Resize(RESIZE), transforms.CenterCrop(CROP),
            transforms.ToTensor(), transforms.Normalize(MEAN, STD),
        ])  # fmt: skip
        self.mask_transform = transforms.Compose([
            transforms.Resize(RESIZE), transforms.CenterCrop(CROP),
            transforms.ToTensor(),
        ])  # fmt: skip

    def load(self):
        """`PatchCore.load()`'s shape probe: train mode, raw ones, up to layer3."""
        self.model.train()
        with torch.no_grad():
            self.layers(torch.ones(1, 3, CROP, CROP))
        self.model.eval()

    def layers(self, x):
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        layer2 = m.layer2(m.layer1(x))
        return layer2, m.layer3(layer2)

    def features(self, paths):
        images = torch.stack([self.image_transform(Image.open(p).convert("RGB"))
                              for p in paths])  # fmt: skip
        with torch.no_grad():
            layer2, layer3 = self.layers(images)
        nhwc = [t.numpy().transpose(0, 2, 3, 1) for t in (layer2, layer3)]
        return torch_patch_features(torch, *nhwc, PRETRAIN_DIM, TARGET_DIM)

    def score(self, features, bank):
        """faiss IndexFlatL2 (squared L2), image max, RescaleSegmentor maps."""
        queries = torch.from_numpy(features.reshape(-1, features.shape[-1]))
        bank = torch.from_numpy(bank)
        squared = (
            (queries**2).sum(1, keepdim=True)
            - 2 * queries @ bank.T
            + (bank**2).sum(1)[None]
        ).clamp_min(0)
        patch = squared.min(dim=1).values.reshape(len(features), -1)
        side = int(round(patch.shape[1] ** 0.5))
        grid = patch.reshape(-1, 1, side, side)
        maps = torch.nn.functional.interpolate(
            grid, size=(CROP, CROP), mode="bilinear", align_corners=False
        )[:, 0].numpy()
        maps = np.stack([scipy.ndimage.gaussian_filter(m, sigma=4) for m in maps])
        return patch.max(dim=1).values.numpy(), maps

    def mask(self, path):
        if path is None:
            return np.zeros((CROP, CROP), bool)
        return self.mask_transform(Image.open(path)).numpy()[0].astype(int) == 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = write_folder(tmp_path_factory.mktemp("reference_data"))
    torch.manual_seed(0)
    model = randomise_batch_norms(torchvision.models.resnet18(weights=None))
    weights = root / "resnet18.safetensors"
    save_file(numpy_state_dict(model), str(weights))  # before the probe moves them
    reference = Reference(model)
    reference.load()
    return root, weights, reference


def fit_and_score(config, tmp_path):
    files = sources.category_files(config, "part")
    mesh = parallel.make_mesh()
    models, _ = patchcore.fit(config, str(tmp_path), "part", files.train, mesh, None)
    predict_fn = patchcore.compile_predict(config, mesh)
    result = evaluate.evaluate_split(predict_fn, models, files.test, config, mesh)
    return files, jax.device_get(models)[0], result


def test_reference_batch_norm_statistics_forward(setup, tmp_path):
    root, weights, reference = setup
    config = reference_config(root, weights)
    key = jax.random.key(0)
    raw = patchcore.encoder_variables(
        reference_config(root, weights, bn_stats_forward=False), "resnet18", key
    )
    moved = patchcore.encoder_variables(config, "resnet18", key)
    state = reference.model.state_dict()
    checked = 0
    for name in ("bn1", "layer1_0/bn1", "layer2_0/downsample_1", "layer3_1/bn2"):
        torch_name = name.replace("/downsample_1", ".downsample.1").replace("_", ".")
        torch_name = torch_name.replace("/", ".")
        stats = moved["batch_stats"]
        for part in name.split("/"):
            stats = stats[part]
        raw_stats = raw["batch_stats"]
        for part in name.split("/"):
            raw_stats = raw_stats[part]
        for ours, theirs in (("mean", "running_mean"), ("var", "running_var")):
            expected = state[f"{torch_name}.{theirs}"].numpy()
            np.testing.assert_allclose(stats[ours], expected, rtol=1e-4, atol=1e-5)
            # The forward really moved them (else this test could not fail).
            assert np.abs(np.asarray(raw_stats[ours]) - expected).max() > 1e-3
            checked += 1
    assert checked == 8


def test_features_scores_maps_and_aurocs_equal_the_reference(setup, tmp_path):
    root, weights, reference = setup
    config = reference_config(root, weights)
    files, model, result = fit_and_score(config, tmp_path / "run")

    train = reference.features([s.path for s in files.train])
    test = reference.features([s.path for s in files.test])
    settings = patchcore.feature_settings(config, "resnet18")
    ours = np.asarray(
        patchcore.frozen_patch_features(
            model["encoder"], input_pipeline_images(files.test, config), settings
        )
    )
    scale = np.abs(test).max()
    print(
        f"features: max |ours - torch| = {np.abs(ours - test).max():.2e} (max {scale:.2f})"
    )
    np.testing.assert_allclose(ours, test, atol=1e-5 * scale)
    bank = train.reshape(-1, TARGET_DIM)
    assert len(model["bank"]) == len(bank)

    scores, maps = reference.score(test, bank)
    masks = np.stack([reference.mask(s.mask_path) for s in files.test])
    labels = np.asarray([s.label for s in files.test])
    np.testing.assert_array_equal(result.masks, masks)
    np.testing.assert_array_equal(result.labels, labels)
    score_error = np.abs(result.scores / scores - 1).max()
    map_error = np.abs(result.maps - maps).max() / maps.max()
    print(f"scores: max relative error {score_error:.2e}; maps {map_error:.2e}")
    np.testing.assert_allclose(result.scores, scores, rtol=1e-4)
    np.testing.assert_allclose(result.maps, maps, rtol=1e-4, atol=1e-4 * maps.max())

    got = metrics.segmentation_metrics(result.masks, result.maps, result.scores)
    pixel = roc_auc_score(masks.ravel().astype(int), maps.ravel())
    image = roc_auc_score(labels, scores)
    print(f"pixel AUROC ours {got['pixel_auroc']:.6f} torch {pixel:.6f}; "
          f"image {got['image_auroc']:.4f} / {image:.4f}")  # fmt: skip
    assert got["pixel_auroc"] == pytest.approx(pixel, abs=1e-5)
    assert got["image_auroc"] == pytest.approx(image, abs=1e-6)


def input_pipeline_images(samples, config):
    """The normalised crops the project feeds the encoder, one batch."""
    dataset = input_pipeline.eval_dataset(
        samples, batch_size=len(samples), **input_pipeline.eval_transform(config.data)
    )
    (batch,) = list(input_pipeline.iterate_numpy(dataset))
    return batch["image"]


def test_without_the_bn_forward_the_features_differ(setup, tmp_path):
    """The option matters: without it the features are not the reference's."""
    root, weights, reference = setup
    config = reference_config(root, weights, bn_stats_forward=False)
    files = sources.category_files(config, "part")
    variables = patchcore.encoder_variables(config, "resnet18", jax.random.key(0))
    settings = patchcore.feature_settings(config, "resnet18")
    ours = np.asarray(
        patchcore.frozen_patch_features(
            variables, input_pipeline_images(files.test, config), settings
        )
    )
    test = reference.features([s.path for s in files.test])
    assert np.abs(ours - test).max() > 1e-2 * np.abs(test).max()
