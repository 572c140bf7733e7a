"""The README's gallery picture, from a run's heatmap gallery.

Stacks a category's score histogram and the panels of its most anomalous test
images, in the gallery's order, with a red frame where the decision at the
calibrated threshold is wrong (as `index.html` marks them).

Usage:  python benchmarks/gallery_picture.py runs/quickstart grass docs/quickstart_gallery.png
"""

import argparse
import os
import re

import numpy as np
from PIL import Image

FRAME = 4  # pixels of the red frame around a wrong decision


def most_anomalous(index_html: str, count: int) -> list[tuple[str, bool]]:
    """(panel file, wrong decision) of the first `count` most anomalous cards."""
    section = index_html.split("<h2>Most anomalous</h2>", 1)[1].split("<h2>", 1)[0]
    cards = re.findall(r'<figure class="card( wrong)?"><a href="([^"]+)"', section)
    return [(src, bool(wrong)) for wrong, src in cards[:count]]


def framed(path: str, wrong: bool) -> np.ndarray:
    """The panel inside a frame: red for a wrong decision, else white."""
    image = np.asarray(Image.open(path).convert("RGB"))
    colour = (200, 30, 30) if wrong else (255, 255, 255)
    height, width = image.shape[:2]
    canvas = np.empty((height + 2 * FRAME, width + 2 * FRAME, 3), np.uint8)
    canvas[:] = colour
    canvas[FRAME:-FRAME, FRAME:-FRAME] = image
    return canvas


def stack(images: list[np.ndarray]) -> np.ndarray:
    """Top to bottom, each centred on a white canvas as wide as the widest."""
    width = max(i.shape[1] for i in images)
    rows = []
    for image in images:
        left = (width - image.shape[1]) // 2
        canvas = np.full((image.shape[0], width, 3), 255, np.uint8)
        canvas[:, left : left + image.shape[1]] = image
        rows.append(canvas)
    return np.concatenate(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("category")
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=6)
    args = parser.parse_args()
    directory = os.path.join(args.workdir, "heatmaps", args.category)
    with open(os.path.join(directory, "index.html")) as f:
        cards = most_anomalous(f.read(), args.count)
    histogram = np.asarray(
        Image.open(os.path.join(directory, "histogram.png")).convert("RGB")
    )
    panels = [framed(os.path.join(directory, src), wrong) for src, wrong in cards]
    Image.fromarray(stack([histogram, *panels])).save(args.out, optimize=True)
    print(f"{args.out}: histogram and {len(panels)} panels of {directory}")


if __name__ == "__main__":
    main()
