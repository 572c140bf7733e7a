"""torch_files.load against torch itself, and against files that must not load.

torch (when installed) writes the files and is the oracle for their contents;
the safety tests also run without torch, on hand-written pickles.
"""

import collections
import io
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from recontrast_jax import torch_files
from recontrast_jax.torch_files import TorchFileError, UnsafeTorchFileError

REPO = pathlib.Path(__file__).resolve().parents[1]
FORMATS = {"zip": True, "legacy": False}  # -> _use_new_zipfile_serialization
LEGACY_HEADER = b"".join(
    pickle.dumps(x, protocol=2)
    for x in (
        0x1950A86A20F9469CFC6C,
        1001,
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {}},
    )
)


def save(obj, path, fmt):
    import torch

    torch.save(obj, path, _use_new_zipfile_serialization=FORMATS[fmt])
    return str(path)


def assert_same(loaded, expected, where="root"):
    """`loaded` is `expected` (a torch object) with arrays for tensors."""
    import torch

    if isinstance(expected, torch.Tensor):
        if expected.dtype == torch.bfloat16:
            expected = expected.float()
        want = expected.detach().numpy()
        assert isinstance(loaded, np.ndarray), where
        assert loaded.dtype == want.dtype, where
        assert loaded.shape == want.shape, where
        assert loaded.flags.c_contiguous and loaded.flags.owndata, where
        assert np.array_equal(loaded, want), where
    elif isinstance(expected, dict | list | tuple):
        assert type(loaded) is type(expected), where
        assert len(loaded) == len(expected), where
        if isinstance(expected, dict):
            assert list(loaded) == list(expected), where
            pairs = [(loaded[k], expected[k], f"{where}[{k!r}]") for k in expected]
        else:
            pairs = [
                (a, b, f"{where}[{i}]")
                for i, (a, b) in enumerate(zip(loaded, expected, strict=True))
            ]
        for a, b, w in pairs:
            assert_same(a, b, w)
    else:
        assert type(loaded) is type(expected) and loaded == expected, where


def everything():
    """A state dict with every case the loader must get right."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(5, 6, generator=gen)
    base = torch.arange(20, dtype=torch.float32)
    return {
        "f32": torch.randn(3, 4, generator=gen),
        "f64": torch.randn(4, generator=gen, dtype=torch.float64),
        "f16": torch.randn(2, 3, generator=gen).half(),
        "bf16": torch.randn(7, generator=gen).bfloat16(),
        "i64": torch.randint(-(2**40), 2**40, (5,), generator=gen),
        "i32": torch.randint(-(2**30), 2**30, (3,), generator=gen, dtype=torch.int32),
        "i16": torch.tensor([-300, 7], dtype=torch.int16),
        "i8": torch.tensor([-5, 9], dtype=torch.int8),
        "u8": torch.randint(0, 256, (2, 2), generator=gen, dtype=torch.uint8),
        "u16": torch.tensor([1, 65535], dtype=torch.uint16),
        "bool": torch.tensor([[True, False], [False, True]]),
        "c64": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
        "transposed": matrix.t(),
        "every_other_column": matrix[:, ::2],
        "offset_slice": base[3:11],
        "shares_storage_a": base[:4].view(2, 2),
        "shares_storage_b": base[15:],
        "expanded": torch.tensor([[1.0, 2.0, 3.0]]).expand(4, 3),
        "scalar": torch.tensor(2.5),
        "int_scalar": torch.tensor(7),
        "empty": torch.zeros(0, 3),
        "parameter": torch.nn.Parameter(torch.randn(2, 2, generator=gen)),
        "nested": {
            "inner": collections.OrderedDict(w=matrix, b=torch.ones(2)),
            "list": [1, "two", matrix[1], None],
            "tuple": (True, 3.5, torch.tensor([1, 2])),
            "epoch": 12,
            "name": "resnet",
        },
        "dtype_value": torch.float16,
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_case_matches_torch(tmp_path, fmt):
    expected = everything()
    loaded = torch_files.load(save(expected, tmp_path / "all.pth", fmt))
    assert loaded.pop("dtype_value") == "torch.float16"
    del expected["dtype_value"]
    assert_same(loaded, expected)
    # Tensors that shared a storage are independent copies.
    loaded["shares_storage_a"][0, 0] = -1
    assert loaded["offset_slice"][0] == 3 and loaded["shares_storage_b"][0] == 15


@pytest.mark.parametrize("fmt", FORMATS)
def test_module_state_dict_matches_torch(tmp_path, fmt):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model(torch.randn(2, 3, 8, 8))  # Non-trivial BatchNorm running statistics.
    state = model.state_dict()
    loaded = torch_files.load(pathlib.Path(save(state, tmp_path / "m.pth", fmt)))
    assert isinstance(loaded, collections.OrderedDict)
    assert list(loaded) == list(state)  # 0.weight ... 1.num_batches_tracked
    assert_same(loaded, state)


class RunsShell:
    """What a malicious `.pth` holds: unpickling it runs a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def assert_refused(path, global_name, marker):
    with pytest.raises(UnsafeTorchFileError) as info:
        torch_files.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refusing to load '{global_name}'"), message
    assert "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_saved_code_is_not_run(tmp_path, fmt):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    evil = {"weight": torch.ones(2), "extra": RunsShell(f"touch {marker}")}
    path = save(evil, tmp_path / "evil.pth", fmt)
    assert_refused(path, f"{os.system.__module__}.system", marker)
    # The file is live: torch.load without weights_only runs it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def eval_pickle(marker, module="builtins", name="eval"):
    """A hand-written pickle calling `module.name` on code that creates `marker`."""
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    return f"c{module}\n{name}\n(V{code}\ntR.".encode()


def zip_file(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return str(path)


def test_hand_written_eval_is_not_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = eval_pickle(marker)
    zip_path = zip_file(tmp_path / "evil.pth", {"archive/data.pkl": payload})
    legacy_path = tmp_path / "evil_legacy.pth"
    legacy_path.write_bytes(LEGACY_HEADER + payload + pickle.dumps([]))
    first_path = tmp_path / "evil_first.pth"  # Instead of the magic number.
    first_path.write_bytes(payload)
    for path in (zip_path, str(legacy_path), str(first_path)):
        assert_refused(path, "builtins.eval", marker)
    pickle.loads(payload)  # The payload is live.
    assert marker.exists()


@pytest.mark.parametrize(
    "module, name",
    [
        ("__builtin__", "getattr"),
        ("builtins", "exec"),
        ("subprocess", "Popen"),
        ("posix", "system"),
        ("torch", "load"),
        ("torch.storage", "_load_from_bytes"),
        ("collections", "defaultdict"),
    ],
)
def test_globals_outside_the_allow_list_are_refused(tmp_path, module, name):
    marker = tmp_path / "pwned"
    payload = eval_pickle(marker, module, name)
    path = zip_file(tmp_path / "evil.pth", {"archive/data.pkl": payload})
    assert_refused(path, f"{module}.{name}", marker)


def assert_unreadable(path, *fragments):
    with pytest.raises(TorchFileError) as info:
        torch_files.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files(tmp_path, fmt):
    torch = pytest.importorskip("torch")
    data = pathlib.Path(
        save({"w": torch.ones(64)}, tmp_path / "w.pth", fmt)
    ).read_bytes()
    for keep in (len(data) - 8, len(data) // 2, 10, 0):
        cut = tmp_path / f"cut{keep}.pth"
        cut.write_bytes(data[:keep])
        assert_unreadable(str(cut))


def test_random_bytes(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(40):
        data = rng.bytes(int(rng.integers(1, 2000)))
        prefix = (b"", b"PK\x03\x04", b"\x80\x02")[i % 3]
        path = tmp_path / f"random{i}.pth"
        path.write_bytes(prefix + data)
        assert_unreadable(str(path))


def test_corrupted_bytes_never_escape_as_other_errors(tmp_path):
    torch = pytest.importorskip("torch")
    state = {"w": torch.arange(6.0).view(2, 3).t(), "b": [torch.ones(2), 3]}
    for fmt in FORMATS:
        path = pathlib.Path(save(state, tmp_path / f"{fmt}.pth", fmt))
        data = bytearray(path.read_bytes())
        rng = np.random.default_rng(1)
        for position in rng.integers(0, len(data), 150):
            bad = data.copy()
            bad[position] ^= 1 << int(rng.integers(0, 8))
            path.write_bytes(bad)
            try:
                torch_files.load(path)
            except TorchFileError:
                pass


def test_missing_storage_record_and_big_endian(tmp_path):
    torch = pytest.importorskip("torch")
    path = save({"w": torch.ones(3)}, tmp_path / "w.pth", "zip")
    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    prefix = next(n for n in members if n.endswith("/data.pkl"))[: -len("data.pkl")]
    missing = {n: d for n, d in members.items() if n != f"{prefix}data/0"}
    assert_unreadable(
        zip_file(tmp_path / "missing.pth", missing),
        f"missing storage record '{prefix}data/0'",
    )
    big = {**members, f"{prefix}byteorder": b"big"}
    assert_unreadable(zip_file(tmp_path / "big.pth", big), "'big'")
    renamed = {n.replace(prefix, "other_name/"): d for n, d in members.items()}
    assert np.array_equal(
        torch_files.load(zip_file(tmp_path / "r.pth", renamed))["w"],
        np.ones(3, np.float32),
    )


def test_plain_pickle_is_not_a_torch_file(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    assert_unreadable(str(path), "neither a zip archive nor a legacy torch.save file")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "hello")
    path.write_bytes(buffer.getvalue())
    assert_unreadable(str(path), "data.pkl")


def test_does_not_import_torch(tmp_path):
    torch = pytest.importorskip("torch")
    path = save({"w": torch.arange(4).view(2, 2).t()}, tmp_path / "w.pth", "zip")
    code = (
        "import sys, recontrast_jax.torch_files as t; "
        f"w = t.load({path!r})['w']; "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "assert w.tolist() == [[0, 2], [1, 3]], w"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_legacy_storage_view(tmp_path):
    """Old torch wrote views of a storage: (view key, first element, size)."""
    main = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n("
        b"(Vstorage\nctorch\nFloatStorage\nVroot\nVcpu\nK\x06(Vview\nK\x02K\x03ttQ"
        b"K\x01K\x02\x85K\x01\x85\x89}tR."
    )
    storage = np.arange(6, dtype="<f4").tobytes()
    path = tmp_path / "view.pth"
    path.write_bytes(
        LEGACY_HEADER
        + main
        + pickle.dumps(["root"])
        + (6).to_bytes(8, "little")
        + storage
    )
    loaded = torch_files.load(path)
    assert loaded.dtype == np.float32 and loaded.tolist() == [3.0, 4.0]
    path.write_bytes(path.read_bytes()[:-4])
    assert_unreadable(str(path), "'root'")
