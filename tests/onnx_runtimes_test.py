"""ONNX export on ONNX Runtime and OpenVINO against the in-process predict.

Each method is trained (or fitted) briefly on the embedded dataset, exported
by export mode, and its `model.onnx` run by both runtimes. The oracle is the
in-process path (`predict.score_samples` with runtime 'jax': the checkpoint,
the tf.data evaluation pipeline and the jitted XLA predict), which shares no
code with the ONNX graph or the runtimes. One file serves two batch sizes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from recontrast_jax import default_config, export, predict, run, runtimes
from recontrast_jax.data import folder, synthetic

RELATIVE_TOLERANCE = 1e-5


def _config(method: str, data) -> default_config.ml_collections.ConfigDict:
    config = default_config.get_config()
    config.method = method
    config.model.arch = "resnet_tiny"
    config.model.pretrained = ""
    config.data.root = str(data)
    config.data.categories = ("grass",)
    config.data.image_size = 40
    config.data.crop_size = 32
    config.train.steps = 12
    config.train.batch_size = 4
    config.eval.batch_size = 4
    config.eval.every = 12
    config.report.num_heatmaps = 0
    config.patchcore.target_dim = 64
    config.reconpatch.feature_dim = 32
    config.reconpatch.projection_dim = 16
    config.reconpatch.epochs = 3
    config.reconpatch.batch_size = 256
    if method == "reconpatch":
        config.patchcore.reweight_neighbors = 3  # Eq. 10, with the argsort
    return config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic.ensure_embedded_dataset(
        tmp_path_factory.mktemp("data") / "data",
        image_size=48, num_train=8, num_test_good=3, num_test_per_defect=2,
    )  # fmt: skip


@pytest.fixture(scope="module", params=["recontrast", "patchcore", "reconpatch"])
def exported(request, dataset, tmp_path_factory):
    """(config, workdir, export dir, test samples) of a trained, exported model."""
    config = _config(request.param, dataset)
    workdir = str(tmp_path_factory.mktemp(request.param))
    with contextlib.redirect_stderr(io.StringIO()):
        run.run(config, workdir)
        (directory,) = export.export_categories(config, workdir)
    paths = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(dataset / "grass" / "test")
        for name in names
    )
    samples = [folder.Sample(p, None, 0, "unknown") for p in paths]
    return config, workdir, directory, samples


def _in_process(config, workdir, samples):
    with contextlib.redirect_stderr(io.StringIO()):
        result = predict.score_samples(config, workdir, "grass", samples)
    return result.maps, result.scores


def _relative_error(actual, expected) -> float:
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_runtime_equals_the_in_process_predict_at_two_batch_sizes(exported, runtime):
    config, workdir, directory, samples = exported
    expected_maps, expected_scores = _in_process(config, workdir, samples)
    model, metadata = runtimes.load(directory, runtime)
    images = np.stack([
        export.preprocess_for_export(folder.load_rgb(s.path), metadata["image_size"])
        for s in samples
    ])  # fmt: skip
    assert len(images) == len(expected_scores) > 4
    for batch in (1, 4):
        parts = [model(images[i : i + batch]) for i in range(0, len(images), batch)]
        maps = np.concatenate([m for m, _ in parts])
        scores = np.concatenate([s for _, s in parts])
        assert maps.shape == expected_maps.shape and maps.dtype == np.float32
        assert _relative_error(maps, expected_maps) <= RELATIVE_TOLERANCE, batch
        assert _relative_error(scores, expected_scores) <= RELATIVE_TOLERANCE, batch


def test_predict_mode_on_a_runtime_writes_the_same_decisions(exported, tmp_path):
    config, workdir, _, _ = exported
    config = config.copy_and_resolve_references()
    config.predict.input = str(config.data.root) + "/grass/test"
    rows = {}
    for runtime in ("jax", "onnxruntime"):
        config.predict.runtime = runtime
        config.predict.output = str(tmp_path / runtime)
        with contextlib.redirect_stderr(io.StringIO()):
            predict.predict(config, workdir)
        with open(tmp_path / runtime / "predictions.csv") as f:
            rows[runtime] = [line.split(",") for line in f.read().splitlines()]
    assert [r[0] for r in rows["jax"]] == [r[0] for r in rows["onnxruntime"]]
    for jax_row, onnx_row in zip(rows["jax"][1:], rows["onnxruntime"][1:], strict=True):
        assert float(onnx_row[1]) == pytest.approx(float(jax_row[1]), rel=1e-5)


def test_a_deploy_machine_with_only_the_export_uses_its_thresholds(exported, tmp_path):
    """No workdir calibration: predict decides with the metadata's thresholds."""
    config, workdir, directory, _ = exported
    config = config.copy_and_resolve_references()
    config.predict.input = str(config.data.root) + "/grass/test"
    config.predict.runtime = "onnxruntime"
    outputs = {}
    for name, place in (("trained", workdir), ("deployed", str(tmp_path / "empty"))):
        if name == "deployed":
            config.export.directory = str(
                shutil.copytree(directory, tmp_path / "export")
            )
        config.predict.output = outputs[name] = str(tmp_path / name)
        with contextlib.redirect_stderr(io.StringIO()):
            predict.predict(config, place)
    with open(os.path.join(directory, "metadata.json")) as f:
        metadata = json.load(f)
    summaries = {}
    for name, output in outputs.items():
        with open(os.path.join(output, "summary.json")) as f:
            summaries[name] = json.load(f)
    assert summaries["deployed"]["thresholds"] == metadata["thresholds"]
    assert (
        summaries["trained"]["thresholds"]["image"] == metadata["thresholds"]["image"]
    )
    for name in outputs:
        with open(os.path.join(outputs[name], "predictions.csv")) as f:
            outputs[name] = f.read()
    assert outputs["deployed"] == outputs["trained"]


def test_the_graph_has_a_dynamic_batch_metadata_and_folded_batchnorm(exported):
    config, _, directory, _ = exported
    model = onnx.load(os.path.join(directory, export.ONNX_FILE))
    onnx.checker.check_model(model)
    (images,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in images.type.tensor_type.shape.dim]
    assert dims == ["batch", 40, 40, 3]
    properties = {p.key: p.value for p in model.metadata_props}
    assert properties["image_size"] == "40" and properties["crop_size"] == "32"
    assert properties["method"] == f'"{config.method}"'
    producers = {out: n.op_type for n in model.graph.node for out in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(len(n.input) == 3 for n in convs)  # BatchNorm became bias
    initializers = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if (
            node.op_type in ("Add", "Sub", "Mul")
            and producers.get(node.input[0]) == "Conv"
        ):
            assert node.input[1] not in initializers, "an affine left after a conv"


def test_missing_model_and_missing_runtime_fail_in_one_line(
    exported, tmp_path, monkeypatch
):
    _, _, directory, _ = exported
    empty = tmp_path / "export"
    empty.mkdir()
    (empty / export.METADATA_FILE).write_text(
        open(os.path.join(directory, export.METADATA_FILE)).read()
    )
    with pytest.raises(runtimes.RuntimeUnavailable, match="run --config.mode=export"):
        runtimes.load(str(empty), "onnxruntime")
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)
    with pytest.raises(
        runtimes.RuntimeUnavailable, match=r"recontrast_jax\[openvino\]"
    ):
        runtimes.load(directory, "openvino")


def test_serving_imports_neither_jax_nor_tensorflow():
    code = (
        "import sys; from recontrast_jax import runtimes; "
        "print(sorted(m for m in ('jax', 'tensorflow', 'torch') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
