"""PyTorch vs this project: the ReContrast train step and inference on the CPU.

The same network (spec recontrast.md section 1: wide_resnet50_2 to layer3 as
trainable encoder E plus a frozen copy E_f, the BN_layer bottleneck, the
de_wide_resnet50_2 decoder with two sets of 1x1 heads) is timed in PyTorch,
written here from the spec, and in this project, so a speed claim has a
reference next to it:

* train step: forward with cross reconstruction (spec 1.4), the hard-mined
  global cosine loss (spec 2; alpha from the schedule at the same step count
  on both sides, -3 at the warm-up step), backward, two AdamW groups (spec
  3.1). BatchNorm modes as in configs/mvtec.py for `bottle` (E in train mode,
  as for 9 of 15 categories; E_f always in eval mode). The project's step runs
  `plain` (E_f inside the step, as PyTorch does) and `cached` (E_f's features
  precomputed, the training loop's default where they fit; the precompute for
  one batch is reported once per setting);
* inference: both encoders, bottleneck and decoder in eval mode, the six
  cosine-distance maps upsampled bilinearly (align_corners=True) and summed,
  Gaussian blur (sigma 4) and the max image score. PyTorch blurs on the host
  with scipy in float64, as the reference does; the project runs
  `compile_predict`.

Every measurement is a fresh process (`fresh_process`), so its peak host
memory is its own; torch, jax plain and jax cached alternate per setting and
round, so a drift of a shared host hits both sides. Each builds the model
(random weights, random images: speed does not depend on them), runs one
warm-up step ("first step", where XLA compiles), then `--steps` timed steps
and reports their median.

Usage:  python benchmarks/torch_side_by_side.py [--train-batches 8,16]
            [--infer-batches 2,16] [--image-size 256] [--steps 3] [--rounds 1]
            [--only train|infer]

ratio = torch s/step / jax s/step: above 1 the project is faster. Prints the
host, a `json:` line per measurement and one markdown table; asserts nothing.
The 256 px defaults take tens of minutes and about 20 GiB.
"""

import argparse
import importlib.metadata
import json
import os
import statistics
import time

import fresh_process

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(os.path.dirname(HERE), "configs", "mvtec.py")
CATEGORY = "bottle"  # picks E's BatchNorm mode from the paper config
CHILD = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "import torch_side_by_side as b; b.child(*sys.argv[2:])"
)


def paper_config(image_size: int):
    """configs/mvtec.py with random initialisation at `image_size` (no downloads)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mvtec_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(CATEGORY)
    config.model.pretrained = ""
    config.data.image_size = config.data.crop_size = image_size
    return config


def alpha_at(step: int, config) -> float:
    """Spec 2: min(-3 + 4 it / (fraction T), 1), `it` = updates already done."""
    warmup = config.train.alpha_warmup_fraction * config.train.steps
    return min(-3.0 + 4.0 * step / warmup, 1.0)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def timed(run, steps: int) -> dict:
    """One warm-up call, then the median of `steps` calls."""
    first = seconds(run)
    median = statistics.median(seconds(run) for _ in range(steps))
    return {"first_step_s": first, "seconds": median}


# --- PyTorch, from the spec -------------------------------------------------


def kaiming_init(module) -> None:
    """Spec 1.2-1.3: every nn.Conv2d kaiming_normal fan_out; ConvT, biases default."""
    from torch import nn

    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def torch_encoder():
    """torchvision wide_resnet50_2 with layer4 and fc removed (spec 1.1)."""
    import torchvision

    encoder = torchvision.models.wide_resnet50_2(weights=None)
    encoder.layer4 = None
    encoder.fc = None
    return encoder


def torch_encode(encoder, x):
    x = encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(x))))
    f1 = encoder.layer1(x)
    f2 = encoder.layer2(f1)
    return [f1, f2, encoder.layer3(f2)]


def torch_bottleneck():
    """BN_layer (spec 1.2), conv4/bn4 included: built, never run."""
    from torch import nn
    from torchvision.models.resnet import Bottleneck, conv1x1, conv3x3

    m = nn.Module()
    m.conv1, m.bn1 = conv3x3(256, 512, 2), nn.BatchNorm2d(512)
    m.conv2, m.bn2 = conv3x3(512, 1024, 2), nn.BatchNorm2d(1024)
    m.conv3, m.bn3 = conv3x3(512, 1024, 2), nn.BatchNorm2d(1024)
    m.conv4, m.bn4 = conv1x1(4096, 2048), nn.BatchNorm2d(2048)
    downsample = nn.Sequential(conv1x1(3072, 2048, 2), nn.BatchNorm2d(2048))
    m.bn_layer = nn.Sequential(
        Bottleneck(3072, 512, 2, downsample, base_width=128),
        *(Bottleneck(2048, 512, base_width=128) for _ in range(2)),
    )
    kaiming_init(m)
    return m


def torch_bottleneck_forward(m, features):
    import torch
    import torch.nn.functional as F

    x0, x1, x2 = features
    l1 = F.relu(m.bn2(m.conv2(F.relu(m.bn1(m.conv1(x0))))))
    l2 = F.relu(m.bn3(m.conv3(x1)))
    return m.bn_layer(torch.cat([l1, l2, x2], dim=1)).contiguous()


def torch_decoder_block(inplanes: int, planes: int, upsample: bool):
    """Decoder Bottleneck (spec 1.3): a 2x2/s2 ConvT where block 0 upsamples."""
    from torch import nn

    width, out = planes * 2, planes * 4  # width_per_group 128
    b = nn.Module()
    b.conv1, b.bn1 = nn.Conv2d(inplanes, width, 1, bias=False), nn.BatchNorm2d(width)
    if upsample:
        b.conv2 = nn.ConvTranspose2d(width, width, 2, stride=2, bias=False)
        b.upsample = nn.Sequential(
            nn.ConvTranspose2d(inplanes, out, 2, stride=2, bias=False),
            nn.BatchNorm2d(out),
        )
    else:
        b.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
    b.bn2 = nn.BatchNorm2d(width)
    b.conv3, b.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
    return b


def torch_decoder():
    """de_wide_resnet50_2(output_conv=2): stages [3,4,6] from 2048 ch, 6 heads."""
    from torch import nn

    decoder, inplanes = nn.Module(), 2048
    for i, (planes, blocks) in enumerate(((256, 3), (128, 4), (64, 6)), start=1):
        stage = [
            torch_decoder_block(inplanes if j == 0 else planes * 4, planes, j == 0)
            for j in range(blocks)
        ]
        setattr(decoder, f"layer{i}", nn.Sequential(*stage))
        inplanes = planes * 4
    for level, c in ((1, 256), (2, 512), (3, 1024)):
        heads = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(2))
        setattr(decoder, f"out{level}", heads)
    kaiming_init(decoder)
    return decoder


def torch_decoder_forward(decoder, x):
    import torch.nn.functional as F

    def block(b, x):
        out = F.relu(b.bn1(b.conv1(x)), inplace=True)
        out = F.relu(b.bn2(b.conv2(out)), inplace=True)
        out = b.bn3(b.conv3(out))
        out += b.upsample(x) if hasattr(b, "upsample") else x
        return F.relu(out, inplace=True)

    maps = []
    for stage in (decoder.layer1, decoder.layer2, decoder.layer3):
        for b in stage:
            x = block(b, x)
        maps.append(x)
    f3, f2, f1 = maps
    heads = (decoder.out1, decoder.out2, decoder.out3)
    return [h[i](f) for i in range(2) for h, f in zip(heads, (f1, f2, f3), strict=True)]


def torch_network():
    """`net` = {encoder, bottleneck, decoder} (the optimised parts) and E_f."""
    import copy

    from torch import nn

    net = nn.ModuleDict(
        {
            "encoder": torch_encoder(),
            "bottleneck": torch_bottleneck(),
            "decoder": torch_decoder(),
        }
    )
    frozen = copy.deepcopy(net["encoder"]).eval().requires_grad_(False)
    return net, frozen


def torch_forward(net, frozen, x):
    """Spec 1.4: targets [f1,f2,f3,e1,e2,e3], reconstructions paired with them."""
    import torch

    en = torch_encode(net["encoder"], x)
    with torch.no_grad():
        en_f = torch_encode(frozen, x)
    joint = [torch.cat([e, f], dim=0) for e, f in zip(en, en_f, strict=True)]
    de = torch_decoder_forward(
        net["decoder"], torch_bottleneck_forward(net["bottleneck"], joint)
    )
    halves = [d.chunk(2, dim=0) for d in de]
    return en_f + en, [h[0] for h in halves[:3]] + [h[1] for h in halves[3:]]


def torch_global_cosine_hm(targets, recons, alpha: float, factor: float):
    """Spec 2: global cosine per level; a hook scales easy points' gradient."""
    import torch
    import torch.nn.functional as F

    loss = 0.0
    for a, b in zip(targets, recons, strict=True):
        a = a.detach()
        with torch.no_grad():
            distance = 1 - F.cosine_similarity(a, b).unsqueeze(1)
            thresh = distance.mean() + alpha * distance.reshape(-1).std()
            weight = torch.where(distance < thresh, factor, 1.0)
        b.register_hook(lambda grad, w=weight: grad * w)
        flat = F.cosine_similarity(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))
        loss = loss + torch.mean(1 - flat)
    return loss


def torch_train_run(net, frozen, images, config):
    """`run()` doing one step: forward, loss, backward, opt1.step(), opt2.step()."""
    import torch

    o = config.optimizer

    def adamw(params, lr):
        return torch.optim.AdamW(
            params,
            lr=lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            weight_decay=o.weight_decay,
        )

    decoder_params = [*net["decoder"].parameters(), *net["bottleneck"].parameters()]
    opt1 = adamw(decoder_params, o.lr_decoder)
    opt2 = adamw(net["encoder"].parameters(), o.lr_encoder)
    encoder_train = config.model.encoder_bn_train and (
        CATEGORY not in config.model.encoder_bn_eval_categories
    )
    net.train()
    net["encoder"].train(encoder_train)
    done = {"steps": 0, "alpha": None}

    def run():
        alpha = alpha_at(done["steps"], config)
        opt1.zero_grad()
        opt2.zero_grad()
        targets, recons = torch_forward(net, frozen, images)
        factor = config.train.mining_factor
        loss = torch_global_cosine_hm(targets[:3], recons[:3], alpha, factor) / 2
        loss = loss + torch_global_cosine_hm(targets[3:], recons[3:], alpha, factor) / 2
        loss.backward()
        opt1.step()
        opt2.step()
        done.update(steps=done["steps"] + 1, alpha=alpha)

    return run, done, encoder_train


def torch_predict(net, frozen, images, sigma: float):
    """Maps (B, H, W) float64 and max scores, as the reference's evaluation."""
    import numpy as np
    import scipy.ndimage
    import torch
    import torch.nn.functional as F

    size = images.shape[-2:]
    with torch.inference_mode():
        targets, recons = torch_forward(net, frozen, images)
        maps = np.zeros((images.shape[0], *size))
        for a, b in zip(targets, recons, strict=True):
            distance = 1 - F.cosine_similarity(a, b).unsqueeze(1)
            up = F.interpolate(distance, size=size, mode="bilinear", align_corners=True)
            maps += up[:, 0].numpy()
    maps = scipy.ndimage.gaussian_filter(maps, sigma=(0, sigma, sigma))
    return maps, maps.reshape(maps.shape[0], -1).max(axis=1)


def torch_params(net) -> tuple[int, int]:
    """(parameters without the unused conv4/bn4, the unused ones)."""
    dead_prefixes = ("bottleneck.conv4.", "bottleneck.bn4.")
    total = dead = 0
    for name, p in net.named_parameters():
        total += p.numel()
        dead += p.numel() if name.startswith(dead_prefixes) else 0
    return total - dead, dead


def torch_child(mode: str, batch: int, size: int, steps: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(111)
    config = paper_config(size)
    start = time.perf_counter()
    net, frozen = torch_network()
    rng = np.random.default_rng(0)
    images = torch.from_numpy(
        rng.normal(size=(batch, 3, size, size)).astype(np.float32)
    )
    extra = {}
    if mode == "train":
        run, done, encoder_train = torch_train_run(net, frozen, images, config)
        extra["encoder_bn_train"] = bool(encoder_train)
    else:
        net.eval()
        sigma = float(config.eval.sigma)

        def run():
            torch_predict(net, frozen, images, sigma)

    build = time.perf_counter() - start
    result = timed(run, steps)
    if mode == "train":
        extra["alpha"] = done["alpha"]
    params, dead = torch_params(net)
    return {
        "build_s": build,
        **result,
        "params": params,
        "unused_params": dead,
        **extra,
    }


# --- This project -----------------------------------------------------------


def jax_cache(arch: str, state, images, mesh) -> tuple[list, float]:
    """E_f's features of `images`, replicated, and the steady time to compute them."""
    import jax

    from recontrast_jax import parallel
    from recontrast_jax.models import recontrast as model

    features = jax.jit(lambda frozen, x: model.frozen_encoder_features(arch, frozen, x))
    jax.block_until_ready(features(state.frozen, images))
    start = time.perf_counter()
    cache = jax.block_until_ready(features(state.frozen, images))
    return parallel.replicate(mesh, list(cache)), time.perf_counter() - start


def jax_train_run(config, state, images, mesh, cached: bool):
    """`run()` doing one donated step; `holder` keeps the newest state."""
    import jax
    import numpy as np

    from recontrast_jax import parallel
    from recontrast_jax.methods import recontrast

    tx = recontrast.make_optimizer(config.optimizer)
    encoder_train = recontrast.encoder_bn_train_mode(config, CATEGORY)
    jitted = recontrast.compile_train_step(config, tx, mesh, encoder_train, cached)
    extra = {"encoder_bn_train": encoder_train}
    batch, cache = {"image": images}, None
    if cached:
        cache, extra["cache_s"] = jax_cache(config.model.arch, state, images, mesh)
        index = np.arange(images.shape[0], dtype=np.int32)
        batch["index"] = parallel.global_batch(mesh, {"i": index})["i"]
    # The training loop's own wrapper: compiled ahead, compiler memory released.
    step = recontrast.batch_step(jitted, cache)
    holder = {"state": state, "metrics": None}

    def run():
        holder["state"], holder["metrics"] = step(holder["state"], batch)
        jax.block_until_ready(holder)

    return run, holder, extra


def jax_child(mode: str, variant: str, batch: int, size: int, steps: int) -> dict:
    import jax
    import numpy as np

    from recontrast_jax import parallel
    from recontrast_jax.methods import recontrast
    from recontrast_jax.models import layers

    config = paper_config(size)
    start = time.perf_counter()
    mesh = parallel.make_mesh()
    tx = recontrast.make_optimizer(config.optimizer)
    key = jax.random.key(config.seed)
    state = recontrast.create_train_state(config.model.arch, size, tx, key)
    state = parallel.replicate(mesh, state)
    params = layers.count_params(state.params)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    images = parallel.global_batch(mesh, {"image": images})["image"]
    extra, holder = {}, None
    if mode == "train":
        run, holder, extra = jax_train_run(
            config, state, images, mesh, variant == "cached"
        )
    else:
        predict = recontrast.compile_predict(config, mesh)

        def run():
            jax.block_until_ready(predict(state, images))

    build = time.perf_counter() - start
    result = timed(run, steps)
    if holder is not None:
        extra["alpha"] = float(holder["metrics"]["alpha"])
    return {"build_s": build, **result, "params": params, **extra}


def child(side: str, variant: str, mode: str, batch: str, size: str, steps: str):
    """Entry point of a measurement process: prints one JSON line."""
    batch, size, steps = int(batch), int(size), int(steps)
    if side == "torch":
        result = torch_child(mode, batch, size, steps)
    else:
        result = jax_child(mode, variant, batch, size, steps)
    result.update(
        side=side, variant=variant, mode=mode, batch=batch, image_size=size,
        steps=steps, images_per_s=batch / result["seconds"], peak_gib=peak_gib(),
    )  # fmt: skip
    print(json.dumps(result), flush=True)


# --- The parent -------------------------------------------------------------


def host() -> str:
    """CPU model, cores, AVX-512 and the two frameworks' versions."""
    with open("/proc/cpuinfo") as f:
        lines = f.read().splitlines()
    field = lambda key: next(  # noqa: E731
        (x.split(":", 1)[1].strip() for x in lines if x.startswith(key)), "?"
    )
    avx512 = "avx512f" in field("flags").split()
    versions = {
        p: importlib.metadata.version(p) for p in ("jax", "torch", "torchvision")
    }
    return (
        f"host: {field('model name')}, {os.cpu_count()} cores, avx512f "
        f"{'yes' if avx512 else 'no'}; "
        + ", ".join(f"{p} {v}" for p, v in versions.items())
    )


def measurements(args) -> list[tuple[str, str, str, int]]:
    """(side, variant, mode, batch) in run order within one round."""
    runs = []
    if args.only in (None, "train"):
        for batch in args.train_batches:
            runs += [
                ("torch", "plain", "train", batch),
                ("jax", "plain", "train", batch),
            ]
            runs.append(("jax", "cached", "train", batch))
    if args.only in (None, "infer"):
        for batch in args.infer_batches:
            runs += [
                ("torch", "plain", "infer", batch),
                ("jax", "plain", "infer", batch),
            ]
    return runs


def summary(results: list[dict], side, variant, mode, batch) -> dict:
    """Medians over rounds (peak memory: the largest)."""
    rs = [
        r
        for r in results
        if (r["side"], r["variant"], r["mode"], r["batch"])
        == (side, variant, mode, batch)
    ]
    med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
    out = {k: med(k) for k in ("seconds", "first_step_s")}
    out["peak_gib"] = max(r["peak_gib"] for r in rs)
    return out


def table(results: list[dict], args) -> list[str]:
    lines = [
        "| setting | batch | torch s/step | jax s/step | ratio | torch peak GiB "
        "| jax peak GiB | first step s (torch / jax) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [("train", b, v) for b in args.train_batches for v in ("plain", "cached")]
    rows += [("infer", b, "plain") for b in args.infer_batches]
    for mode, batch, variant in rows:
        if args.only not in (None, mode):
            continue
        t = summary(results, "torch", "plain", mode, batch)
        j = summary(results, "jax", variant, mode, batch)
        name = f"{mode}, {args.image_size} px" + (
            ", jax cached" if variant == "cached" else ""
        )
        lines.append(
            f"| {name} | {batch} | {t['seconds']:.3f} | {j['seconds']:.3f} | "
            f"{t['seconds'] / j['seconds']:.2f} | {t['peak_gib']:.2f} | "
            f"{j['peak_gib']:.2f} | {t['first_step_s']:.1f} / {j['first_step_s']:.1f} |"
        )
    return lines


def notes(results: list[dict]) -> list[str]:
    """Parameter counts of both sides and the E_f precompute times."""
    torch_r = next(r for r in results if r["side"] == "torch")
    jax_r = next(r for r in results if r["side"] == "jax")
    same = "equal" if torch_r["params"] == jax_r["params"] else "DIFFERENT"
    lines = [
        f"parameters (encoder + bottleneck + decoder): torch {torch_r['params']:,} "
        f"(+ {torch_r['unused_params']:,} in the unused conv4/bn4), "
        f"jax {jax_r['params']:,}: {same}"
    ]
    for r in results:
        if "cache_s" in r:
            lines.append(
                f"jax cached, batch {r['batch']}, round {r['round']}: E_f features of the "
                f"batch precomputed in {r['cache_s']:.3f} s (once per image in training)"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--train-batches", type=ints, default=[8, 16])
    parser.add_argument("--infer-batches", type=ints, default=[2, 16])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", choices=("train", "infer"))
    args = parser.parse_args()
    print(host(), flush=True)
    results = []
    for round_ in range(args.rounds):
        for side, variant, mode, batch in measurements(args):
            r = fresh_process.run_json(
                CHILD, HERE, side, variant, mode, batch, args.image_size, args.steps
            )
            r["round"] = round_
            results.append(r)
            print("json: " + json.dumps(r), flush=True)
    print("\n".join(["", *table(results, args), "", *notes(results)]))


if __name__ == "__main__":
    main()
