"""The Colab notebooks in colabs/: committed without outputs, and executed headlessly.

Each notebook runs top to bottom in a fresh Jupyter kernel (nbclient) with tiny
settings injected in a cell right after its `parameters` cell, papermill-style:
one category, 20 steps, 32 px images, the tiny encoders, and an MVTec-layout
dataset generated into tmp_path. Any error in any cell fails the test; the files
the notebook wrote are then checked against what its parameters asked for.
The execution tests skip when nbclient, nbformat, ipykernel or matplotlib is
missing; the output check needs none of them.
"""

import ast
import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COLABS = REPO / "colabs"
NOTEBOOKS = (
    "quickstart.ipynb",
    "reproduce_mvtec.ipynb",
    "import_pytorch_checkpoint.ipynb",
    "reconpatch.ipynb",
)
CELL_TIMEOUT_SECONDS = 600


def read_notebook_json(name: str) -> dict:
    with open(COLABS / name, encoding="utf-8") as f:
        return json.load(f)


def cell_source(cell) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def parameters_cell_index(cells) -> int:
    """Index of the one code cell tagged `parameters`."""
    tagged = [
        i
        for i, cell in enumerate(cells)
        if "parameters" in cell.get("metadata", {}).get("tags", [])
    ]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {tagged}"
    assert cells[tagged[0]]["cell_type"] == "code"
    return tagged[0]


def assigned_names(source: str) -> set[str]:
    """Names bound by top-level `NAME = ...` statements."""
    return {
        target.id
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def inject_parameters(nb, values: dict) -> None:
    """Inserts `NAME = value` assignments right after the `parameters` cell.

    Every injected name must be a parameter the notebook declares, so a renamed
    parameter fails here instead of being silently ignored.

    Args:
      nb: The notebook (nbformat v4), changed in place.
      values: Parameter name -> value; each value is written as its repr.
    """
    import nbformat

    index = parameters_cell_index(nb.cells)
    declared = assigned_names(cell_source(nb.cells[index]))
    unknown = sorted(set(values) - declared)
    assert not unknown, f"not parameters of the notebook: {unknown}"
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory) -> pathlib.Path:
    """A JAX compilation cache shared by the notebooks run in this process.

    The quickstart and MVTec notebooks train the same tiny model at the same
    size, so the second reuses the first one's compiled programs.
    """
    return tmp_path_factory.mktemp("jax_compilation_cache")


@pytest.fixture
def kernel_env(tmp_path, compilation_cache) -> dict:
    """The test process's environment, made hermetic and quick for small runs."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        JAX_PLATFORMS="cpu",
        # Compilation dominates a 20-step run: unoptimised XLA compiles faster,
        # and every program (even the small eager ones of model init) is cached.
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        TF_CPP_MIN_LOG_LEVEL="3",
        HF_HUB_OFFLINE="1",  # nothing may be downloaded
        RECONTRAST_JAX_DATA=str(tmp_path / "embedded_cache"),
    )
    return env


def execute(name: str, values: dict, tmp_path, env: dict) -> tuple[object, float]:
    """Runs a notebook of colabs/ in a fresh kernel with `values` injected.

    Args:
      name: File name of the notebook in colabs/.
      values: Parameter values to inject after the `parameters` cell.
      tmp_path: Where the executed copy is written (also when a cell fails).
      env: The kernel's environment.

    Returns:
      The executed notebook (with its outputs) and the seconds it took.
    """
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    nb = nbformat.read(COLABS / name, as_version=4)
    inject_parameters(nb, values)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_SECONDS,
        # The kernel starts in colabs/, as when the notebook is opened from a
        # checkout, so it finds the repository's configs/ one level up.
        resources={"metadata": {"path": str(COLABS)}},
    )
    start = time.perf_counter()
    try:
        client.execute(env=env)
    finally:  # the executed copy, outputs and tracebacks included, for inspection
        nbformat.write(nb, tmp_path / f"executed_{name}")
    seconds = time.perf_counter() - start
    print(f"{name}: executed in {seconds:.1f} s")
    return nb, seconds


def all_text_outputs(nb) -> str:
    """Every stream and text/plain or text/markdown output of the notebook."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output.get("text", ""))
            data = output.get("data", {})
            parts.extend(data.get(kind, "") for kind in ("text/plain", "text/markdown"))
    return "\n".join(parts)


def count_images(nb) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in nb.cells
        for output in cell.get("outputs", [])
    )


def mvtec_layout_copy(tmp_path, category: str) -> pathlib.Path:
    """A small MVTec-layout folder: one embedded category renamed to an MVTec one."""
    from recontrast_jax.data import synthetic

    embedded = synthetic.ensure_embedded_dataset(
        tmp_path / "embedded",
        image_size=48,
        num_train=8,
        num_test_good=3,
        num_test_per_defect=1,
    )
    root = tmp_path / "mvtec"
    shutil.copytree(embedded / "brick", root / category)
    return root


def test_committed_notebooks_have_no_outputs():
    for name in NOTEBOOKS:
        nb = read_notebook_json(name)
        parameters_cell_index(nb["cells"])
        for cell in nb["cells"]:
            if cell["cell_type"] != "code":
                continue
            where = f"{name}, cell {cell.get('id')}"
            assert cell["outputs"] == [], f"{where} has outputs"
            assert cell["execution_count"] is None, f"{where} has an execution count"


def test_parameter_injection_overrides_and_checks_names():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(COLABS / "quickstart.ipynb", as_version=4)
    index = parameters_cell_index(nb.cells)
    inject_parameters(nb, {"STEPS": 3, "CATEGORIES": ("grass",)})
    injected = nb.cells[index + 1]
    assert injected.metadata["tags"] == ["injected-parameters"]
    namespace = {}
    exec(cell_source(nb.cells[index]) + "\n" + cell_source(injected), namespace)
    assert namespace["STEPS"] == 3 and namespace["CATEGORIES"] == ("grass",)
    with pytest.raises(AssertionError, match="NOT_A_PARAMETER"):
        inject_parameters(nb, {"NOT_A_PARAMETER": 1})


def test_quickstart_notebook(tmp_path, kernel_env):
    workdir = tmp_path / "work"
    nb, _ = execute(
        "quickstart.ipynb",
        {
            "STEPS": 20,
            "CATEGORIES": ("grass",),
            "IMAGE_SIZE": 32,
            "BATCH_SIZE": 8,
            "WORKDIR": str(workdir),
            "DATA_ROOT": str(tmp_path / "embedded"),
            "NUM_PREDICT_IMAGES": 2,
        },
        tmp_path,
        kernel_env,
    )
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert list(metrics["categories"]) == ["grass"]
    assert metrics["categories"]["grass"]["steps"] == 20
    # Predict mode scored the two normal images and their patched copies.
    output = workdir / "predictions" / "grass"
    with open(output / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == [
        "normal_0.png",
        "normal_1.png",
        "patched_0.png",
        "patched_1.png",
    ]
    text = all_text_outputs(nb)
    assert "backend: cpu" in text
    for row in rows:  # the notebook's table shows every prediction
        assert f"| {row['path']} | {float(row['score']):.3f} |" in text
    # Figures: heatmap panels, histogram, predict inputs, predict panels.
    assert count_images(nb) >= 4


def test_reproduce_mvtec_notebook(tmp_path, kernel_env):
    workdir = tmp_path / "work"
    nb, _ = execute(
        "reproduce_mvtec.ipynb",
        {
            "DATA_ROOT": str(mvtec_layout_copy(tmp_path, "bottle")),
            "CATEGORY": "bottle",
            "STEPS": 20,
            "PRETRAINED": "",
            "IMAGE_SIZE": 32,
            "ARCH": "resnet_tiny",
            "BATCH_SIZE": 8,
            "WORKDIR": str(workdir),
        },
        tmp_path,
        kernel_env,
    )
    ours = json.loads((workdir / "metrics.json").read_text())["categories"]["bottle"]
    assert ours["steps"] == 20
    text = all_text_outputs(nb)
    # The comparison table: our numbers next to the authors' bottle numbers
    # (spec recontrast.md section 5: 100 / 98.99 / 97.09).
    expected_rows = [
        ("image AUROC", "image_auroc", 100.0),
        ("pixel AUROC", "pixel_auroc", 98.99),
        ("AUPRO, per image (the paper's)", "aupro_recontrast_per_image", 97.09),
    ]
    for label, key, paper in expected_rows:
        value = 100 * ours[key]
        assert f"| {label} | {value:.2f} | {paper:.2f} | {value - paper:+.2f} |" in text
    assert f"| AUPRO, standard MVTec (to FPR 0.3) | {100 * ours['aupro']:.2f} |" in text
    assert "train.steps=20 instead of 2000" in text
    assert "model.pretrained='' instead of 'imagenet'" in text
    assert count_images(nb) >= 2


def test_import_pytorch_checkpoint_notebook(tmp_path, kernel_env):
    workdir = tmp_path / "work"
    checkpoint = tmp_path / "authors" / "recontrast_bottle.safetensors"
    nb, _ = execute(
        "import_pytorch_checkpoint.ipynb",
        {
            "CHECKPOINT_PATH": str(checkpoint),
            "DATA_ROOT": str(mvtec_layout_copy(tmp_path, "bottle")),
            "CATEGORY": "bottle",
            "ARCH": "resnet_tiny_bottleneck",
            "IMAGE_SIZE": 32,
            "WORKDIR": str(workdir),
            "DEMO_CHECKPOINT": True,
        },
        tmp_path,
        kernel_env,
    )
    from safetensors.numpy import load_file

    keys = list(load_file(str(checkpoint)))
    assert keys and all(k.startswith("module.") for k in keys)  # as DataParallel saves
    for part in ("encoder.", "encoder_freeze.", "bottleneck.", "decoder."):
        assert any(k.startswith("module." + part) for k in keys), part
    # The import wrote the checkpoint at the paper config's final step, and
    # evaluate mode evaluated it without training.
    steps = os.listdir(workdir / "checkpoints" / "bottle")
    assert sorted(p for p in steps if p.isdigit()) == ["2000"]
    ours = json.loads((workdir / "metrics.json").read_text())["categories"]["bottle"]
    assert ours["steps"] == 2000
    assert 0.0 <= ours["pixel_auroc"] <= 1.0
    assert "these numbers mean nothing" in all_text_outputs(nb)


def anomalous_cells_from_mask_files(mask_paths, image_size: int, cell: int) -> int:
    """Grid cells that overlap a ground-truth mask, counted straight from the PNGs.

    Masks are resized as the pipeline is documented to do (PIL bilinear, then
    `> 0`); a cell counts when any of its pixels is set.
    """
    import numpy as np
    from PIL import Image

    count = 0
    for path in mask_paths:
        mask = (
            Image.open(path)
            .convert("L")
            .resize((image_size, image_size), Image.BILINEAR)
        )
        mask = np.asarray(mask) > 0
        for top in range(0, image_size, cell):
            for left in range(0, image_size, cell):
                count += bool(mask[top : top + cell, left : left + cell].any())
    return count


def test_reconpatch_notebook(tmp_path, kernel_env):
    import numpy as np

    workdir = tmp_path / "work"
    data_root = tmp_path / "embedded"
    nb, _ = execute(
        "reconpatch.ipynb",
        {
            "CATEGORIES": ("grass",),
            "EPOCHS": 2,
            "IMAGE_SIZE": 32,
            "ARCH": "resnet_tiny",
            "PRETRAINED": "",
            "WORKDIR": str(workdir),
            "DATA_ROOT": str(data_root),
            "HEATMAP_IMAGES": 2,
            "PCA_NORMAL_PATCHES": 300,
        },
        tmp_path,
        kernel_env,
    )
    base, ours = (
        json.loads((workdir / method / "metrics.json").read_text())["categories"][
            "grass"
        ]
        for method in ("patchcore", "reconpatch")
    )
    text = all_text_outputs(nb)
    assert "backend: cpu" in text
    # The side-by-side table holds the two metrics.json files' numbers.
    for label, key in [
        ("image AUROC", "image_auroc"),
        ("pixel AUROC", "pixel_auroc"),
        ("AUPRO", "aupro"),
        ("pixel AP", "pixel_ap"),
    ]:
        row = f"| grass | {label} | {100 * base[key]:.2f} | {100 * ours[key]:.2f} "
        assert row + f"| {100 * (ours[key] - base[key]):+.2f} |" in text, label
    # Only ReConPatch trained: EPOCHS passes of whole 1024-patch batches (one
    # batch of all patches when there are fewer).
    assert "train_steps" not in base
    assert ours["train_steps"] == 2 * max(1, int(ours["train_patches"]) // 1024)
    assert "same frozen encoder in both runs: True" in text

    pca = np.load(workdir / "pca_grass.npz")
    anomalous = pca["anomalous"]
    # Normal points: the random subset of the training patches.
    assert (~anomalous).sum() == min(300, int(ours["train_patches"]))
    # Anomalous points: every 8x8 cell of a test image that touches its mask.
    masks = sorted((data_root / "grass" / "ground_truth").glob("*/*.png"))
    assert masks
    assert anomalous.sum() == anomalous_cells_from_mask_files(masks, 32, 8)
    # f(p) is the checkpointed linear layer f applied to p.
    from recontrast_jax import checkpointing
    from recontrast_jax.methods import patchcore

    ckpt = checkpointing.manager(str(workdir / "reconpatch" / "checkpoints" / "grass"))
    head = patchcore.saved_model(ckpt)["head"]["f"]
    expected = pca["p"].astype(np.float64) @ head["kernel"] + head["bias"]
    np.testing.assert_allclose(pca["f_p"], expected, rtol=1e-4, atol=1e-4)
    # The 2-D projections equal sklearn's PCA, up to the sign of each component.
    decomposition = pytest.importorskip("sklearn.decomposition")
    for points, projected in (("p", "p_2d"), ("f_p", "f_p_2d")):
        reference = decomposition.PCA(2, svd_solver="full").fit_transform(
            pca[points].astype(np.float64)
        )
        signs = np.sign(np.sum(reference * pca[projected], axis=0))
        scale = np.abs(reference).max()
        np.testing.assert_allclose(
            pca[projected], reference * signs, atol=1e-3 * scale, err_msg=points
        )
    # Figures: the heatmap comparison and the PCA.
    assert count_images(nb) >= 2


def setup_cell(name: str) -> str:
    """The notebook's install cell (the one that defines REPO_URL)."""
    cells = read_notebook_json(name)["cells"]
    return next(cell_source(c) for c in cells if "REPO_URL = " in cell_source(c))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_setup_cell_clones_repo_url_when_there_is_no_checkout(name, tmp_path):
    source = setup_cell(name).replace('REPO_URL = ""', f"REPO_URL = {str(REPO)!r}", 1)
    assert f"REPO_URL = {str(REPO)!r}" in source
    script = tmp_path / "setup_cell.py"
    script.write_text(
        source + "\nprint('quickstart', load_config('quickstart').method)\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "quickstart recontrast" in proc.stdout
    assert (tmp_path / "recontrast_jax_src" / "configs" / "quickstart.py").is_file()


def test_setup_cell_without_checkout_or_repo_url_says_what_to_set(tmp_path):
    script = tmp_path / "setup_cell.py"
    script.write_text(setup_cell("quickstart.ipynb"))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "set REPO_URL" in last and "WHEEL" in last
