"""Times the host-side metrics of recontrast_jax.metrics on MVTec-sized data.

Synthetic test set: 100 anomaly maps of 256x256 (the ReContrast evaluation
resolution), 30% good images, the others with 1-4 elliptic defects of random
size; maps are smoothed noise plus a smoothed defect signal, blurred with a
Gaussian of sigma 4 like the real pipeline, so almost every score is distinct.

Usage:  python benchmarks/metrics_timing.py [--images 100] [--size 256] [--repeats 3]

Prints a table of the best wall time over the repeats; asserts nothing.
"""

import argparse
import time

import numpy as np
import scipy.ndimage

from recontrast_jax import metrics

SIGNAL = 0.3  # defect strength relative to the noise: pixel AUROC ~0.97, AU-PRO ~0.86


def make_test_set(
    num_images: int, size: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (masks, maps): bool (N, size, size) and float64 (N, size, size)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    masks = np.zeros((num_images, size, size), dtype=bool)
    defective = rng.permutation(num_images)[int(round(0.3 * num_images)) :]
    for i in defective:
        for _ in range(rng.integers(1, 5)):
            center_r, center_c = rng.uniform(0.1, 0.9, size=2) * size
            radius_r, radius_c = rng.uniform(0.01, 0.08, size=2) * size
            masks[i] |= ((rows - center_r) / radius_r) ** 2 + (
                (cols - center_c) / radius_c
            ) ** 2 <= 1.0
    noise = scipy.ndimage.gaussian_filter(rng.normal(size=masks.shape), sigma=(0, 2, 2))
    signal = scipy.ndimage.gaussian_filter(masks.astype(np.float64), sigma=(0, 3, 3))
    maps = scipy.ndimage.gaussian_filter(noise + SIGNAL * signal + 1.0, sigma=(0, 4, 4))
    return masks, maps


def best_time(function, repeats: int) -> tuple[float, object]:
    """Best wall-clock time in seconds over `repeats` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    masks, maps = make_test_set(args.images, args.size)
    image_scores = maps.reshape(args.images, -1).max(axis=1)
    num_good = int(np.sum(~masks.any(axis=(1, 2))))
    print(
        f"{args.images} maps of {args.size}x{args.size}, {num_good} good images, {masks.mean():.2%} anomalous pixels, {np.unique(maps).size} distinct scores"
    )

    cases = {
        "aupro (MVTec, fpr_limit=0.3)": lambda: metrics.aupro(masks, maps),
        "pro_curve, full (no truncation)": lambda: (
            metrics.pro_curve(masks, maps)[0].size
        ),
        "aupro_recontrast_per_image": lambda: metrics.aupro_recontrast_per_image(
            masks, maps
        ),
        "pixel auroc": lambda: metrics.auroc(masks, maps),
        "segmentation_metrics (all)": lambda: metrics.segmentation_metrics(
            masks, maps, image_scores
        )["aupro"],
    }
    print(f"{'metric':<34} {'seconds':>8}  value")
    for name, function in cases.items():
        seconds, value = best_time(function, args.repeats)
        print(f"{name:<34} {seconds:8.3f}  {value}")


if __name__ == "__main__":
    main()
