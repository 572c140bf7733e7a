"""Read PyTorch `.pth` files (what `torch.save` writes) without PyTorch, safely.

Why: torchvision and third-party weights ship as `.pth` files, and this library
should read them without installing PyTorch. A `.pth` file is a pickle, and
unpickling runs whatever code the file names (`torch.load` without
`weights_only` does). Here the unpickler knows only an explicit allow-list of
globals (`collections.OrderedDict`, torch's tensor-rebuild functions, storage
classes and dtypes), each mapped to a pure-Python stand-in; anything else is
refused with `UnsafeTorchFileError` before it can run. PyTorch is never
imported.

Both serialisations are read: the zip archive (`<prefix>/data.pkl` plus one
`<prefix>/data/<key>` record per storage; the default since torch 1.6) and the
legacy one (`_use_new_zipfile_serialization=False`: magic number, protocol
version, system info, the main pickle, the list of storage keys, then each
storage as an int64 element count and its raw bytes).

Tensors become C-contiguous numpy arrays that own their memory (tensors that
shared a storage become independent copies). dtypes: float16/32/64, bfloat16,
int8/16/32/64, uint8/16/32/64, bool, complex64/128. numpy has no bfloat16, so
bfloat16 tensors come back as float32 (exact: every bfloat16 is a float32).
Other dtypes (float8, quantized tensors) are not read. A torch dtype stored as
a plain value comes back as its name, e.g. the string `"torch.float32"`.
Only little-endian files are read.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import struct
import zipfile

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b"PK\x03\x04"

# torch dtype name -> numpy dtype of its (little-endian) bytes. bfloat16 is read
# as its bit pattern and widened to float32 in `_TensorRef.to_array`.
_NUMPY_DTYPES = {
    "float32": "<f4",
    "float64": "<f8",
    "float16": "<f2",
    "bfloat16": "<u2",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint8": "u1",
    "uint16": "<u2",
    "uint32": "<u4",
    "uint64": "<u8",
    "bool": "?",
    "complex64": "<c8",
    "complex128": "<c16",
}
# Typed storage classes (`torch.FloatStorage`) -> the dtype of their elements.
_STORAGE_CLASSES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
# dtypes torch may name that have no numpy counterpart here: the file is not
# unsafe, but such tensors cannot be read.
_UNSUPPORTED_DTYPES = (
    "complex32",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
)


class TorchFileError(ValueError):
    """The file is not a readable `torch.save` file (one line: file and cause)."""


class UnsafeTorchFileError(TorchFileError):
    """The file holds something other than tensors and plain containers."""


class _Invalid(Exception):
    """A malformed file; `load` adds the path and raises `TorchFileError`."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Dtype:
    """Stand-in for a torch dtype or storage class (immutable, so a pickle's
    BUILD opcode cannot alter the shared instances)."""

    name: str  # key of _NUMPY_DTYPES, or an unsupported dtype
    torch_name: str  # e.g. "torch.float32", "torch.FloatStorage"

    @property
    def itemsize(self) -> int:
        return np.dtype(_NUMPY_DTYPES.get(self.name, "u1")).itemsize


class _Storage:
    """Stand-in for a storage: its record `key`, element dtype and first element
    (non-zero only for the legacy format's storage views)."""

    def __init__(self, key: str, dtype: _Dtype, start: int):
        self.key, self.dtype, self.start = key, dtype, start


class _TensorRef:
    """Stand-in for a tensor, made into an array once the storages are read."""

    def __init__(self, storage, storage_offset, size, stride, dtype=None):
        if not isinstance(storage, _Storage):
            raise _Invalid("a tensor is built from something other than a storage")
        self.storage, self.offset = storage, storage_offset
        self.size, self.stride = size, stride
        self.dtype = storage.dtype if dtype is None else dtype
        if not isinstance(self.dtype, _Dtype):
            raise _Invalid(f"a tensor has dtype {self.dtype!r:.80}")

    def to_array(self, raw: dict[str, bytes]) -> np.ndarray:
        if self.dtype.name not in _NUMPY_DTYPES:
            raise _Invalid(
                f"tensors of dtype {self.dtype.torch_name} are not supported"
            )
        dtype = np.dtype(_NUMPY_DTYPES[self.dtype.name])
        size, stride, offset = self.size, self.stride, self.offset
        if not (
            isinstance(size, tuple | list)
            and isinstance(stride, tuple | list)
            and len(size) == len(stride)
            and all(type(n) is int and n >= 0 for n in (offset, *size, *stride))
        ):
            raise _Invalid(f"a tensor has size {size!r:.80} and stride {stride!r:.80}")
        if 0 in size:
            array = np.zeros(size, dtype.newbyteorder("="))
        else:
            buffer = raw[self.storage.key]
            start = (self.storage.start + offset) * dtype.itemsize
            extent = 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
            if start + extent * dtype.itemsize > len(buffer):
                raise _Invalid(
                    f"a tensor reaches past the end of storage {self.storage.key!r}"
                )
            flat = np.frombuffer(buffer, dtype, count=extent, offset=start)
            view = np.lib.stride_tricks.as_strided(
                flat, shape=size, strides=[s * dtype.itemsize for s in stride]
            )
            array = np.array(view, dtype.newbyteorder("="), order="C")
        if self.dtype.name == "bfloat16":  # The top half of a float32's bits.
            bits, array = array, np.empty(array.shape, np.float32)
            np.left_shift(bits, 16, out=array.view(np.uint32), dtype=np.uint32)
        return array


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """`torch._utils._rebuild_tensor` and `_rebuild_tensor_v2`."""
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, _grad, _hooks, dtype, *_):
    """`torch._utils._rebuild_tensor_v3`: an untyped (byte) storage and a dtype."""
    return _TensorRef(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, *_ignored):
    """`torch._utils._rebuild_parameter[_with_state]`: a Parameter is its data."""
    if not isinstance(data, _TensorRef):
        raise _Invalid("a Parameter is built from something other than a tensor")
    return data


def _allowed_globals() -> dict[tuple[str, str], object]:
    table: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    }
    for module in ("torch", "torch.storage"):
        table[(module, "UntypedStorage")] = _Dtype("uint8", f"{module}.UntypedStorage")
    for cls, name in _STORAGE_CLASSES.items():
        table[("torch", cls)] = _Dtype(name, f"torch.{cls}")
    for name in (*_NUMPY_DTYPES, *_UNSUPPORTED_DTYPES):
        table[("torch", name)] = _Dtype(name, f"torch.{name}")
    return table


_ALLOWED_GLOBALS = _allowed_globals()


class _Unpickler(pickle.Unpickler):
    """Unpickles with the allow-list; records the storages referenced."""

    def __init__(self, file, path: str, storages: dict[str, list[int]]):
        super().__init__(file, encoding="utf-8")
        self._path = path
        # storage key -> [element size of its type, bytes needed]
        self._storages = storages

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeTorchFileError(
                f"{self._path}: refusing to load {module + '.' + name!r}: only "
                "tensors and plain containers are read (this file may run code if "
                "loaded by torch.load without weights_only)"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise _Invalid(f"unsupported persistent id {pid!r:.80}")
        _, dtype, key, _location, numel, *view = pid
        # Old legacy files may reference a view (key, first element, size).
        view = view[0] if view else None
        start = view[1] if isinstance(view, tuple) and len(view) == 3 else 0
        if not (
            isinstance(dtype, _Dtype)
            and isinstance(key, str)
            and (view is None or isinstance(view, tuple) and len(view) == 3)
            and all(type(n) is int and n >= 0 for n in (numel, start))
        ):
            raise _Invalid(f"malformed storage reference {pid!r:.80}")
        record = self._storages.setdefault(key, [dtype.itemsize, 0])
        record[1] = max(record[1], numel * dtype.itemsize)
        return _Storage(key, dtype, start)


def load(path: str | os.PathLike) -> object:
    """Reads a `torch.save` file without PyTorch and without running its code.

    Args:
      path: a file written by `torch.save` (zip or legacy format), e.g. a
        torchvision `.pth` state dict.

    Returns:
      The saved object: tensors (and nn.Parameters) as C-contiguous numpy arrays
      that own their memory (bfloat16 as float32), containers as plain Python
      objects (OrderedDict, dict, list, tuple, int, float, str, bool, None).

    Raises:
      UnsafeTorchFileError: the file names a global outside the allow-list
        (nothing from it was run).
      TorchFileError: the file is not a readable `torch.save` file.
      OSError: the file cannot be opened.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            is_zip = f.read(4) == _ZIP_MAGIC
            f.seek(0)
            obj, raw = _read_zip(f, path) if is_zip else _read_legacy(f, path)
            return _resolve(obj, raw, {})
        except UnsafeTorchFileError:
            raise
        except _Invalid as e:
            raise TorchFileError(f"{path}: {_one_line(e)}") from None
        except Exception as e:
            cause = f"{type(e).__name__}: {_one_line(e)}"
            raise TorchFileError(
                f"{path}: not a readable torch.save file ({cause})"
            ) from e


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _read_zip(f, path: str) -> tuple[object, dict[str, bytes]]:
    with zipfile.ZipFile(f) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if not pickles:
            raise _Invalid(
                "a zip archive without <prefix>/data.pkl: not a torch.save file"
            )
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in names:
            order = archive.read(prefix + "byteorder").decode("ascii", "replace")
            if order.strip() != "little":
                raise _Invalid(f"byte order {order.strip()!r}: only 'little' is read")
        storages: dict[str, list[int]] = {}
        with archive.open(pickles[0]) as data_pkl:
            obj = _Unpickler(data_pkl, path, storages).load()
        raw = {}
        for key, (_, nbytes) in storages.items():
            name = f"{prefix}data/{key}"
            try:
                info = archive.getinfo(name)
            except KeyError:
                raise _Invalid(f"missing storage record {name!r}") from None
            if info.file_size < nbytes:
                raise _Invalid(f"storage record {name!r} is shorter than its tensors")
            with archive.open(info) as record:
                raw[key] = record.read(nbytes)
            if len(raw[key]) < nbytes:
                raise _Invalid(f"storage record {name!r} is truncated")
    return obj, raw


def _read_legacy(f, path: str) -> tuple[object, dict[str, bytes]]:
    def unpickle(storages=None):
        return _Unpickler(f, path, {} if storages is None else storages).load()

    if unpickle() != _LEGACY_MAGIC:
        raise _Invalid("neither a zip archive nor a legacy torch.save file")
    version = unpickle()
    if version != _LEGACY_PROTOCOL:
        raise _Invalid(f"legacy protocol version {version!r:.20} is not supported")
    sys_info = unpickle()
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", True)):
        raise _Invalid("byte order 'big': only 'little' is read")
    storages: dict[str, list[int]] = {}
    obj = unpickle(storages)
    keys = unpickle()
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise _Invalid("malformed list of storage keys")
    file_size = os.fstat(f.fileno()).st_size
    raw = {}
    for key in keys:
        if key not in storages:
            raise _Invalid(f"storage record {key!r} is not used by any tensor")
        itemsize, needed = storages[key]
        header = f.read(8)
        if len(header) < 8:
            raise _Invalid(f"truncated before storage record {key!r}")
        (numel,) = struct.unpack("<q", header)
        nbytes = numel * itemsize
        if not needed <= nbytes <= file_size - f.tell():
            raise _Invalid(f"storage record {key!r} is truncated or malformed")
        raw[key] = f.read(nbytes)
    missing = storages.keys() - raw.keys()
    if missing:
        raise _Invalid(f"missing storage record {sorted(missing)[0]!r}")
    return obj, raw


def _resolve(obj, raw: dict[str, bytes], memo: dict[int, object]):
    """`obj` with stand-ins replaced: tensors by arrays, dtypes by their names.

    Lists and dicts are updated in place (keeping attributes such as a state
    dict's `_metadata` and shared references); `memo` guards against cycles.
    """
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, _TensorRef):
        memo[id(obj)] = obj.to_array(raw)
    elif isinstance(obj, _Dtype):
        return obj.torch_name
    elif isinstance(obj, _Storage):
        raise _Invalid("bare storages (not inside a tensor) are not supported")
    elif isinstance(obj, list):
        memo[id(obj)] = obj
        obj[:] = [_resolve(item, raw, memo) for item in obj]
    elif isinstance(obj, dict):
        memo[id(obj)] = obj
        for key, value in list(obj.items()):
            obj[key] = _resolve(value, raw, memo)
    elif isinstance(obj, tuple):
        memo[id(obj)] = tuple(_resolve(item, raw, memo) for item in obj)
    else:
        return obj
    return memo[id(obj)]
