"""CPU inference speed and memory of one model on four runtimes.

For ReContrast and PatchCore, the same randomly initialised model scores random
images on:

* `torch`: PyTorch eager. ReContrast is `torch_side_by_side.py`'s network and
  inference (`torch_predict`: eval mode, maps, scipy blur, max score);
  PatchCore is written below from the reference code (spec reconpatch.md
  section 1.3-1.5): torchvision backbone to layer3, 3x3 unfold, layer3
  upsampled after unfolding, per-layer and joint adaptive average pooling,
  `torch.cdist` nearest neighbour against the bank in chunks of
  `patchcore.knn_memory_mb`, max score, bilinear upsampling and scipy blur.
  It has its own random weights: the work matches the other runtimes, the
  numbers do not;
* `jax`: the library's jitted `compile_predict` in process, on normalised
  float32 crops (as `evaluate.evaluate_split` feeds it); ReContrast's state
  is restored from a checkpoint as predict mode does (`recontrast.restore`:
  no optimiser state);
* `onnxruntime`, `openvino` (float32) and `openvino-bf16` (where the CPU has
  bfloat16; dropped with a note elsewhere): the `model.onnx` that
  `export.export_model` wrote, through `runtimes.load`, on uint8 images (crop
  and normalisation run inside the model, a negligible share of the work).

The export is written once per setting by a setup process (`--export-timeout`)
into `--cache/<method>_<arch>_<image>x<crop>[_bank<M>]` and reused when it is
there, with ReContrast's checkpoint beside it; for PatchCore the jax process
rebuilds the same model from the same seeds (weights from `config.seed`, bank
from numpy seed 0), so every runtime but torch runs the same weights. The settings are the paper configs' (configs/mvtec.py:bottle
for ReContrast, 256 px; configs/patchcore_mvtec.py for PatchCore, 256 px
cropped to 224, squared L2, 16384 x 1024 bank) with random weights, and
`--arch`/sizes overridden when given.

Every (method, runtime, batch) is a fresh process, so its peak RSS is its own
(`of it imports` is the RSS once the runtime's modules are imported, before the
model; `recontrast_jax.runtimes` imports neither jax nor TensorFlow). It builds or
loads the model (`load s`), makes one first call (`first call s`, where XLA
compiles and ONNX Runtime/OpenVINO allocate), then `--repeats` calls whose
median is `s/batch`. Every runtime keeps its default thread count (all cores,
or all physical cores). A process that fails or runs past `--timeout` is
reported as such in the table.

Paper setting (wide_resnet50_2, batches 1, 2, 16; tens of minutes and several
GiB on a 16-core host):

  python benchmarks/deploy_cpu.py --out deploy_cpu.json

Quick check (`torch` for `resnet_tiny` runs torchvision resnet18 for PatchCore,
a heavier network, its ratios marked `*`; ReContrast's torch network is
wide_resnet50_2 only, so its row reads n/a):

  python benchmarks/deploy_cpu.py --arch resnet_tiny --image-size 64 \\
      --crop-size 64 --bank-size 512 --batches 1,2 --repeats 2

vs torch = torch s/batch / runtime s/batch at the same method and batch: above
1 the runtime is faster. Prints the host, a `json:` line per process and one
markdown table (with `--out`, also written as JSON and as `<out>.md`); asserts
nothing about timings.
"""

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch_side_by_side as side

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(HERE), "configs")
PAPER_CONFIGS = {"recontrast": "mvtec.py", "patchcore": "patchcore_mvtec.py"}
CATEGORY = "bottle"  # ReContrast's encoder BatchNorm mode comes from the category
RUNTIMES = ("torch", "jax", "onnxruntime", "openvino", "openvino-bf16")
# Archs of the project with no torchvision model of that name (PatchCore only).
TORCH_ARCHS = {"resnet_tiny": "resnet18"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Imported before the clock starts; the peak RSS after them is reported apart.
IMPORTS = {
    "torch": ("torch", "torchvision", "scipy.ndimage"),
    "jax": ("jax", "recontrast_jax.methods.lookup", "recontrast_jax.parallel"),
    "onnxruntime": ("onnxruntime", "recontrast_jax.runtimes"),
    "openvino": ("openvino", "recontrast_jax.runtimes"),
}
CHILD = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "import deploy_cpu as b; b.{}(sys.argv[2])"
)


# --- Settings ----------------------------------------------------------------


def paper_config(method: str):
    """The method's paper config, random weights, one backbone (no downloads)."""
    path = os.path.join(CONFIGS, PAPER_CONFIGS[method])
    spec = importlib.util.spec_from_file_location(f"{method}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(CATEGORY)
    config.model.pretrained = ""
    config.patchcore.ensemble = ()
    return config


def configure(setting: dict):
    """The config of a setting (the dict every process receives)."""
    config = paper_config(setting["method"])
    config.model.arch = setting["arch"]
    config.data.image_size = setting["image_size"]
    config.data.crop_size = setting["crop_size"]
    return config


def settings(args) -> list[dict]:
    """One setting per method: the paper sizes unless overridden."""
    out = []
    for method in args.methods:
        paper = paper_config(method)
        image = args.image_size or paper.data.image_size
        crop = args.crop_size or min(paper.data.crop_size, image)
        setting = {"method": method, "arch": args.arch, "image_size": image,
                   "crop_size": crop, "bank_size": args.bank_size,
                   "target_dim": int(paper.patchcore.target_dim)}  # fmt: skip
        name = f"{method}_{args.arch}_{image}x{crop}"
        if method == "patchcore":
            name += f"_bank{args.bank_size}"
        setting["export_dir"] = os.path.join(args.cache, name)
        out.append(setting)
    return out


# --- Inputs and the model ------------------------------------------------------


def uint8_images(batch: int, size: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)


def normalised_crops(images, crop: int):
    """The exported model's preprocessing on the host: float32 NHWC crops.

    Written out rather than taken from `input_pipeline`, which imports jax and
    TensorFlow and would swell the torch process's memory.
    """
    import numpy as np

    top = int(round((images.shape[1] - crop) / 2.0))  # torchvision CenterCrop
    crops = images[:, top : top + crop, top : top + crop].astype(np.float32) / 255
    return ((crops - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def random_bank(setting: dict, config):
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (setting["bank_size"], int(config.patchcore.target_dim))
    return rng.normal(size=shape).astype(np.float32)


def jax_model(setting: dict, config):
    """The method's model from `config.seed`: a ReContrast state or a bank list."""
    import jax
    import numpy as np

    from recontrast_jax.methods import patchcore, recontrast

    key = jax.random.key(config.seed)
    arch, crop = config.model.arch, config.data.crop_size
    if setting["method"] == "recontrast":
        tx = recontrast.make_optimizer(config.optimizer)
        return recontrast.create_train_state(arch, crop, tx, key)
    normalization = np.asarray(patchcore.IDENTITY_NORMALIZATION, np.float32)
    return [{"encoder": patchcore.encoder_variables(config, arch, key), "head": {},
             "bank": random_bank(setting, config),
             "normalization": normalization}]  # fmt: skip


CHECKPOINT_CATEGORY = "bench"  # its category name in the cached workdir


def workdir(setting: dict) -> str:
    """Where the setup saves the ReContrast checkpoint that the jax child restores."""
    return os.path.join(setting["export_dir"], "workdir")


def setup(setting_json: str) -> None:
    """Setup process: exports the model (and saves ReContrast's checkpoint) once."""
    from recontrast_jax import checkpointing, export
    from recontrast_jax.methods import recontrast

    setting = json.loads(setting_json)
    directory = setting["export_dir"]
    files = [
        os.path.join(directory, f) for f in (export.ONNX_FILE, export.METADATA_FILE)
    ]
    checkpoint = recontrast.checkpoint_dir(workdir(setting), CHECKPOINT_CATEGORY)
    if setting["method"] == "recontrast":
        files.append(checkpoint)
    if all(os.path.exists(f) for f in files):
        print(json.dumps({"export_dir": directory, "cached": True}), flush=True)
        return
    config = configure(setting)
    start = time.perf_counter()
    model = jax_model(setting, config)
    export.export_model(model, config, directory, saved_model=False)
    if setting["method"] == "recontrast":
        checkpointing.save(checkpointing.manager(checkpoint, config=config), 1, model)
    result = {"export_dir": directory, "cached": False,
              "export_s": time.perf_counter() - start}  # fmt: skip
    print(json.dumps(result), flush=True)


# --- PyTorch -------------------------------------------------------------------


def torch_layers(backbone, x):
    """torchvision ResNet's layer2 and layer3 maps."""
    x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
    layer2 = backbone.layer2(backbone.layer1(x))
    return layer2, backbone.layer3(layer2)


def torch_patch_features(layer2, layer3, pretrain_dim: int, target_dim: int):
    """PatchCore's `_embed`: [B, h2*w2, target_dim] from NCHW layer2/layer3.

    Each layer is unfolded 3x3 (zero padding 1) first; layer3's unfolded
    [B, C*9, h3*w3] is upsampled bilinearly to layer2's grid channel by channel.
    """
    import torch
    import torch.nn.functional as F

    batch, _, height, width = layer2.shape
    unfolded2 = F.unfold(layer2, kernel_size=3, padding=1)
    unfolded3 = F.unfold(layer3, kernel_size=3, padding=1)
    grid = unfolded3.reshape(-1, 1, *layer3.shape[-2:])
    grid = F.interpolate(
        grid, size=(height, width), mode="bilinear", align_corners=False
    )
    unfolded3 = grid.reshape(batch, -1, height * width)
    per_layer = [
        F.adaptive_avg_pool1d(
            u.transpose(1, 2).reshape(-1, 1, u.shape[1]), pretrain_dim
        )
        for u in (unfolded2, unfolded3)
    ]
    stacked = torch.cat(per_layer, dim=-1)  # [N, 1, 2 * pretrain_dim]
    pooled = F.adaptive_avg_pool1d(stacked, target_dim)
    return pooled.reshape(batch, height * width, target_dim)


def torch_nearest(features, bank, budget_bytes: int, squared: bool):
    """Distance of every row of `features` [N, d] to its nearest bank row."""
    import torch

    rows = max(1, budget_bytes // (4 * bank.shape[0]))
    nearest = torch.cat(
        [torch.cdist(c, bank).min(dim=1).values for c in features.split(rows)]
    )
    return nearest**2 if squared else nearest


def torch_patchcore_predict(backbone, bank, images, config):
    """Maps (B, crop, crop) float64 and max scores, as PatchCore's reference."""
    import scipy.ndimage
    import torch
    import torch.nn.functional as F

    pc, crop = config.patchcore, config.data.crop_size
    with torch.inference_mode():
        features = torch_patch_features(
            *torch_layers(backbone, images), pc.pretrain_dim, pc.target_dim
        )
        batch, patches, dim = features.shape
        budget = pc.knn_memory_mb * 1024 * 1024
        squared = pc.distance == "squared"
        scores = torch_nearest(features.reshape(-1, dim), bank, budget, squared)
        side = int(round(patches**0.5))
        grid = scores.reshape(batch, 1, side, side)
        up = F.interpolate(
            grid, size=(crop, crop), mode="bilinear", align_corners=False
        )
    maps = scipy.ndimage.gaussian_filter(
        up[:, 0].double().numpy(), sigma=(0, config.eval.sigma, config.eval.sigma)
    )
    return maps, scores.reshape(batch, patches).max(dim=1).values.numpy()


def torch_run(setting: dict, config, images) -> tuple:
    """`run()` for PyTorch eager, and the torchvision arch it runs."""
    import torch
    import torchvision

    torch.manual_seed(config.seed)
    crops = torch.from_numpy(
        normalised_crops(images, config.data.crop_size).transpose(0, 3, 1, 2).copy()
    )
    arch = config.model.arch
    if setting["method"] == "recontrast":
        if arch != "wide_resnet50_2":
            raise Unavailable("the torch ReContrast network is wide_resnet50_2 only")
        net, frozen = side.torch_network()
        net.eval()
        sigma = float(config.eval.sigma)
        return lambda: side.torch_predict(net, frozen, crops, sigma), arch
    arch = TORCH_ARCHS.get(arch, arch)
    backbone = getattr(torchvision.models, arch)(weights=None).eval()
    bank = torch.from_numpy(random_bank(setting, config))
    return lambda: torch_patchcore_predict(backbone, bank, crops, config), arch


# --- JAX, ONNX Runtime, OpenVINO ------------------------------------------------


def jax_run(setting: dict, config, images):
    """`run()` for the library's jitted predict on the host's normalised crops."""
    import jax

    from recontrast_jax import parallel
    from recontrast_jax.methods import lookup

    mesh = parallel.make_mesh()
    method = lookup.get(config.method)
    if setting["method"] == "recontrast":  # as predict mode: restored, no optimiser
        model = method.restore(config, workdir(setting), CHECKPOINT_CATEGORY, mesh)
    else:
        model = parallel.replicate(mesh, jax_model(setting, config))
    predict = method.compile_predict(config, mesh)
    crops = normalised_crops(images, config.data.crop_size)

    def run():
        batch = parallel.global_batch(mesh, {"image": crops})["image"]
        return jax.block_until_ready(predict(model, batch))

    return run


def exported_run(setting: dict, runtime: str, images):
    """`run()` for the exported `model.onnx` on ONNX Runtime or OpenVINO."""
    from recontrast_jax import runtimes

    name, _, suffix = runtime.partition("-")
    precision = "bfloat16" if suffix == "bf16" else "float32"
    try:
        predict, _ = runtimes.load(setting["export_dir"], name, precision)
    except runtimes.RuntimeUnavailable as e:
        raise Unavailable(str(e)) from None
    return lambda: predict(images)


# --- One measurement process ----------------------------------------------------


class Unavailable(RuntimeError):
    """A runtime that cannot run this setting here: reported, not failed."""


def measure(setting: dict, runtime: str, batch: int, repeats: int) -> dict:
    config = configure(setting)
    images = uint8_images(batch, config.data.image_size)
    for module in IMPORTS[runtime.split("-")[0]]:
        importlib.import_module(module)
    extra = {"imports_gib": side.peak_gib()}
    start = time.perf_counter()
    if runtime == "torch":
        import torch

        run, extra["torch_arch"] = torch_run(setting, config, images)
        extra["threads"] = torch.get_num_threads()
    elif runtime == "jax":
        run = jax_run(setting, config, images)
    else:
        run = exported_run(setting, runtime, images)
    load = time.perf_counter() - start
    first = side.seconds(run)
    steady = statistics.median(side.seconds(run) for _ in range(repeats))
    return {"load_s": load, "first_call_s": first, "seconds": steady,
            "images_per_s": batch / steady, **extra}  # fmt: skip


def child(request_json: str) -> None:
    """Entry point of a measurement process: prints one JSON line."""
    request = json.loads(request_json)
    try:
        result = measure(
            request["setting"], request["runtime"], request["batch"], request["repeats"]
        )
    except Unavailable as e:
        result = {"unavailable": str(e)}
    result["peak_gib"] = side.peak_gib()
    print(json.dumps(result), flush=True)


# --- The parent (kept free of jax and the runtimes: its RSS would not matter,
# but nothing heavy should be imported where the children are forked from) ----


def run_child(entry: str, argument: dict, timeout: float) -> dict:
    """The last stdout JSON line of a fresh process, or what went wrong."""
    code = CHILD.format(entry)
    command = [sys.executable, "-c", code, HERE, json.dumps(argument)]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode or not lines:
        errors = out.stderr.strip().splitlines() or [f"exit status {out.returncode}"]
        return {"error": f"failed: {errors[-1][:200]}"}
    return json.loads(lines[-1])


def bfloat16_note(timeout: float) -> str | None:
    """Why openvino-bf16 cannot run here, or None where it can."""
    code = (
        "from recontrast_jax import runtimes; import json; "
        "print(json.dumps({'bf16': runtimes.openvino_bfloat16_supported()}))"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True,
            timeout=timeout, check=True,
        )  # fmt: skip
    except (subprocess.SubprocessError, OSError) as e:
        return f"OpenVINO did not start ({type(e).__name__})"
    if json.loads(out.stdout.strip().splitlines()[-1])["bf16"]:
        return None
    return "this CPU has no AVX-512 BF16 or AMX: OpenVINO runs float32 only"


def host() -> str:
    """torch_side_by_side's host line plus the two deployment runtimes."""
    versions = []
    for package in ("onnxruntime", "openvino"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    return f"{side.host()}, {', '.join(versions)}"


def measure_all(args, runtimes: list[str]) -> list[dict]:
    results = []
    for setting in settings(args):
        exported = any(r not in ("torch", "jax") for r in runtimes)
        if exported:
            done = run_child("setup", setting, args.export_timeout)
            print("export: " + json.dumps(done), flush=True)
        for batch in args.batches:
            for runtime in runtimes:
                request = {"setting": setting, "runtime": runtime, "batch": batch,
                           "repeats": args.repeats}  # fmt: skip
                if exported and "error" in done and runtime not in ("torch", "jax"):
                    result = {"error": f"no export ({done['error']})"}
                else:
                    result = run_child("child", request, args.timeout)
                result.update(method=setting["method"], runtime=runtime, batch=batch,
                              setting=setting)  # fmt: skip
                results.append(result)
                print("json: " + json.dumps(result), flush=True)
    return results


def torch_result(results: list[dict], r: dict) -> dict:
    """The torch measurement at r's method and batch ({} if none)."""
    same = (r["method"], r["batch"])
    return next(
        (t for t in results
         if t["runtime"] == "torch" and (t["method"], t["batch"]) == same),
        {},
    )  # fmt: skip


def row(r: dict, torch_r: dict) -> str:
    """One table row; `*` marks ratios against another backbone's torch run."""
    head = f"| {r['method']} | {r['runtime']} | {r['batch']} |"
    if "seconds" not in r:
        why = (r.get("error") or f"n/a: {r['unavailable']}").replace("|", "/")
        return f"{head} {why} | | | | | | |"
    ratio = "-"
    if "seconds" in torch_r:
        other = torch_r["torch_arch"] != r["setting"]["arch"]
        ratio = f"{torch_r['seconds'] / r['seconds']:.2f}" + ("*" if other else "")
    if r["runtime"] == "torch":
        head = f"| {r['method']} | torch ({r['torch_arch']}) | {r['batch']} |"
    return (
        f"{head} {r['load_s']:.1f} | {r['first_call_s']:.2f} | {r['seconds']:.3f} | "
        f"{r['images_per_s']:.1f} | {r['peak_gib']:.2f} | {r['imports_gib']:.2f} | "
        f"{ratio} |"
    )


def table(results: list[dict]) -> list[str]:
    lines = [
        "| method | runtime | batch | load s | first call s | s/batch | img/s "
        "| peak RSS GiB | of it imports GiB | vs torch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [row(r, torch_result(results, r)) for r in results]
    if any(r.get("torch_arch", r["setting"]["arch"]) != r["setting"]["arch"]
           for r in results):  # fmt: skip
        lines += ["", "* torch ran another backbone (in brackets): not comparable"]
    return lines


def settings_line(results: list[dict]) -> list[str]:
    seen = {r["method"]: r["setting"] for r in results}
    return [
        f"{m}: {s['arch']}, image {s['image_size']}, crop {s['crop_size']}"
        + (f", bank {s['bank_size']} x {s['target_dim']}" if m == "patchcore" else "")
        + f"; export {s['export_dir']}"
        for m, s in seen.items()
    ]


def write(path: str, header: list[str], results: list[dict], lines: list[str]):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"header": header, "results": results}, f, indent=1)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write("\n".join([*header, "", *lines]) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--methods", type=names, default=["recontrast", "patchcore"])
    parser.add_argument("--runtimes", type=names, default=list(RUNTIMES))
    parser.add_argument("--batches", type=lambda s: [int(x) for x in names(s)],
                        default=[1, 2, 16])  # fmt: skip
    parser.add_argument("--arch", default="wide_resnet50_2")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--crop-size", type=int)
    parser.add_argument("--bank-size", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600, help="s per runtime")
    parser.add_argument("--export-timeout", type=float, default=1800)
    parser.add_argument(
        "--cache", default=os.path.join(tempfile.gettempdir(), "deploy_cpu_cache")
    )
    parser.add_argument("--out", help="JSON path; the table goes next to it (.md)")
    args = parser.parse_args()
    for name, known in (("methods", PAPER_CONFIGS), ("runtimes", RUNTIMES)):
        unknown = set(getattr(args, name)) - set(known)
        if unknown:
            parser.error(f"--{name}: unknown {sorted(unknown)}; use {list(known)}")
    header = [host(), "threads: each runtime's default (all cores)"]
    runtimes = list(args.runtimes)
    if "openvino-bf16" in runtimes:
        note = bfloat16_note(args.timeout)
        if note:
            runtimes.remove("openvino-bf16")
            header.append(f"openvino-bf16 left out: {note}")
    print("\n".join(header), flush=True)
    results = measure_all(args, runtimes)
    lines = table(results)
    header += settings_line(results)
    print("\n".join(["", *settings_line(results), "", *lines]))
    if args.out:
        write(args.out, header, results, lines)


if __name__ == "__main__":
    main()
