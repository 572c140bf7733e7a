"""Weight conversion and loading without PyTorch: names, layouts, files, errors."""

import os
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from recontrast_jax import checkpointing, convert, default_config, pretrained, run
from recontrast_jax.methods import recontrast as recontrast_method
from recontrast_jax.models import recontrast

ARCH = "resnet_tiny_bottleneck"


def real_variables(arch=ARCH, seed=0):
    variables, frozen = recontrast.init_variables(arch, jax.random.key(seed), 32)
    # Non-trivial BN statistics so that mean/var mix-ups would show.
    variables = jax.tree_util.tree_map(np.asarray, variables)
    rng = np.random.default_rng(seed)
    variables["batch_stats"] = jax.tree_util.tree_map(
        lambda a: rng.uniform(0.5, 2.0, a.shape).astype(np.float32),
        variables["batch_stats"],
    )
    return variables, jax.tree_util.tree_map(np.asarray, frozen)


def encoder_part(variables):
    return {c: variables[c]["encoder"] for c in ("params", "batch_stats")}


def assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_torch_names_follow_torchvision():
    assert pretrained.torch_key("params", ("layer1_0", "downsample_1", "scale")) == (
        "layer1.0.downsample.1.weight"
    )
    assert pretrained.torch_key("batch_stats", ("bn1", "var")) == "bn1.running_var"
    assert pretrained.torch_key("params", ("bn_layer_2", "conv3", "kernel")) == (
        "bn_layer.2.conv3.weight"
    )
    assert pretrained.torch_key("params", ("out3_1", "bias")) == "out3.1.bias"


def test_layouts_are_transposes_of_each_other():
    w = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # (O, I, kh, kw)
    flax_kernel = pretrained.to_flax_layout(w)
    assert flax_kernel.shape == (4, 5, 3, 2)
    assert flax_kernel[1, 2, 0, 1] == w[1, 0, 1, 2]
    np.testing.assert_array_equal(pretrained.to_torch_layout(flax_kernel), w)


def test_round_trip_flax_state_dict_flax_is_identity():
    variables, _ = real_variables()
    state_dict = pretrained.variables_to_state_dict(variables)
    assert "encoder.layer1.0.downsample.1.running_var" in state_dict
    back = pretrained.state_dict_to_variables(state_dict, variables)
    assert_trees_equal(back, {c: variables[c] for c in ("params", "batch_stats")})


def test_mismatches_are_all_listed():
    variables, _ = real_variables()
    encoder = encoder_part(variables)
    state_dict = pretrained.variables_to_state_dict(encoder)
    del state_dict["layer2.0.conv1.weight"]
    state_dict["layer1.0.bn1.weight"] = np.ones(3, np.float32)
    state_dict["layer9.0.conv1.weight"] = np.ones((1, 1, 1, 1), np.float32)
    state_dict["layer4.0.conv1.weight"] = np.ones((1, 1, 1, 1), np.float32)  # ignored
    state_dict["bn1.num_batches_tracked"] = np.asarray(3)  # always dropped
    with pytest.raises(pretrained.ConversionError) as info:
        pretrained.state_dict_to_variables(
            state_dict, encoder, ignore=pretrained.ENCODER_UNUSED
        )
    message = str(info.value)
    assert "1 missing" in message and "layer2.0.conv1.weight" in message
    assert "1 unexpected" in message and "layer9.0.conv1.weight" in message
    assert "1 mis-shaped" in message and "layer1.0.bn1.weight" in message
    assert "layer4" not in message and "num_batches_tracked" not in message


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".msgpack"])
def test_pretrained_file_becomes_encoder_and_frozen_encoder(tmp_path, suffix):
    source, _ = real_variables(seed=5)
    encoder = encoder_part(source)
    path = str(tmp_path / f"weights{suffix}")
    state_dict = pretrained.variables_to_state_dict(encoder)
    state_dict["fc.weight"] = np.zeros(
        (10, 5), np.float32
    )  # torchvision extras are fine
    if suffix == ".safetensors":
        save_file(state_dict, path)
    elif suffix == ".npz":
        np.savez(path, **state_dict)
    else:
        pretrained.save_msgpack(path, encoder)
    tx = recontrast_method.make_optimizer(default_config.get_config().optimizer)
    state = recontrast_method.create_train_state(
        ARCH, 32, tx, jax.random.key(1), pretrained=path
    )
    state = jax.device_get(state)
    assert_trees_equal(state.params["encoder"], encoder["params"])
    assert_trees_equal(state.batch_stats["encoder"], encoder["batch_stats"])
    assert_trees_equal(state.frozen, encoder)


@pytest.mark.parametrize("zip_format", [True, False])
def test_pth_files_are_read_without_torch(tmp_path, monkeypatch, zip_format):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_()
    expected = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    path = tmp_path / "resnet18.pth"
    torch.save(
        {"state_dict": model.state_dict()},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    monkeypatch.setitem(sys.modules, "torch", None)  # reading must not need it
    got = pretrained.read_state_dict(str(path))
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_a_pth_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    evil = (
        b"\x80\x02cposix\nsystem\nq\x00X"
        + len(f"touch {marker}").to_bytes(4, "little")
        + f"touch {marker}".encode()
        + b"\x85R."
    )
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", evil)
    with pytest.raises(pretrained.PretrainedWeightsError) as raised:
        pretrained.read_state_dict(str(path))
    message = str(raised.value)
    assert str(path) in message and "posix.system" in message
    assert "\n" not in message
    assert not marker.exists()


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(pretrained.PretrainedWeightsError, match="does not exist"):
        pretrained.read_state_dict(str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(pretrained.PretrainedWeightsError, match=str(bad)):
        pretrained.read_state_dict(str(bad))


def test_torchvision_file_name_hash_is_checked(tmp_path):
    path = tmp_path / "resnet18-deadbeef.pth"
    path.write_bytes(b"tampered")
    with pytest.raises(pretrained.PretrainedWeightsError, match="deadbeef"):
        pretrained.verify_torchvision_file_hash(str(path))


def test_download_checks_recorded_sha256(tmp_path):
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"something else")

    def downloader(repo_id, filename):
        assert (repo_id, filename) == (
            "timm/wide_resnet50_2.tv_in1k",
            "model.safetensors",
        )
        return str(fake)

    with pytest.raises(pretrained.PretrainedWeightsError, match="recorded sha256"):
        pretrained.download_v1_weights("wide_resnet50_2", downloader)


def test_offline_without_file_explains_what_to_download(tmp_path):
    code = (
        "from recontrast_jax import pretrained\n"
        "try:\n"
        "    pretrained.download_v1_weights('wide_resnet50_2')\n"
        "except pretrained.PretrainedWeightsError as e:\n"
        "    print(e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "https://huggingface.co/timm/wide_resnet50_2.tv_in1k" in out
    assert "wide_resnet50_2-95faca4d.pth" in out
    assert "--config.model.pretrained=" in out
    assert "IMAGENET1K_V2" in out


def authors_state_dict(variables, frozen):
    """An authors'-format state dict made from Flax variables (plus dead keys)."""
    state_dict = {}
    for part in ("encoder", "bottleneck", "decoder"):
        part_vars = {c: variables[c][part] for c in ("params", "batch_stats")}
        state_dict |= pretrained.variables_to_state_dict(part_vars, f"{part}.")
    state_dict |= pretrained.variables_to_state_dict(frozen, "encoder_freeze.")
    state_dict["bottleneck.conv4.weight"] = np.zeros((4, 4, 1, 1), np.float32)
    state_dict["bottleneck.bn4.running_mean"] = np.zeros(4, np.float32)
    state_dict["decoder.layer1.0.bn1.num_batches_tracked"] = np.asarray(5, np.int64)
    return {"module." + k: v for k, v in state_dict.items()}  # as nn.DataParallel saves


def test_convert_writes_a_checkpoint_main_evaluates(tmp_path, tiny_dataset):
    variables, frozen = real_variables(seed=2)
    frozen["batch_stats"] = jax.tree_util.tree_map(
        lambda a: a * 1.5, frozen["batch_stats"]
    )
    path = str(tmp_path / "recontrast_brick.safetensors")
    save_file(authors_state_dict(variables, frozen), path)

    config = default_config.get_config()
    config.model.arch = ARCH
    config.data.root = str(tiny_dataset)
    config.data.categories = ("brick",)
    config.data.image_size = config.data.crop_size = 32
    config.train.steps = 7
    workdir = str(tmp_path / "work")
    directory = convert.import_checkpoint(path, config, workdir, "brick")

    tx = recontrast_method.make_optimizer(config.optimizer)
    target = recontrast_method.create_train_state(ARCH, 32, tx, jax.random.key(9))
    restored = jax.device_get(
        checkpointing.restore_latest(checkpointing.manager(directory), target)
    )
    assert int(restored.step) == 7
    assert_trees_equal(restored.params, variables["params"])
    assert_trees_equal(restored.batch_stats, variables["batch_stats"])
    assert_trees_equal(restored.frozen, frozen)

    summary = run.run(config, workdir)  # evaluates, trains nothing
    result = summary["categories"]["brick"]
    assert result["steps"] == 7 and result["train_seconds"] < 1.0
    assert 0.0 <= result["pixel_auroc"] <= 1.0
    with pytest.raises(FileExistsError):
        convert.import_checkpoint(path, config, workdir, "brick")
