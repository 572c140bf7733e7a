"""Tests for recontrast_jax.metrics against independent oracles.

Oracles: scikit-learn (ROC/PR metrics, ``auc``), deliberately naive
per-threshold transcriptions of the MVTec AU-PRO and of RD4AD's ``compute_pro``
written below with ``skimage.measure`` for the connected components, and small
curves worked out by hand.
"""

import statistics

import numpy as np
import pytest
import scipy.ndimage
import sklearn.metrics
from skimage import measure

from recontrast_jax import metrics

# --------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------


def _random_binary_data(seed, size=600, decimals=None):
    rng = np.random.default_rng(seed)
    # Seed 2 has mostly positive labels (the implementation switches on the
    # minority class).
    labels = rng.random(size) < (0.7 if seed == 2 else 0.3)
    scores = rng.normal(size=size) + 1.2 * labels
    if decimals is not None:  # rounding creates many tied scores, across classes
        scores = np.round(scores, decimals)
    return labels.astype(int), scores


BINARY_CASES = [(seed, decimals) for seed in range(3) for decimals in (None, 1, 0)]


def _toy_stack(decimals=None, seed=0):
    """Four 16x16 images: three with 2-3 regions each, one good image."""
    masks = np.zeros((4, 16, 16), dtype=bool)
    masks[0, 2:5, 2:6] = True  # 12-pixel rectangle
    masks[0, 10:12, 9:15] = True  # 12-pixel bar
    masks[1, 3, 3] = True  # two squares touching only at a corner:
    masks[1, 4:6, 4:6] = True  # one region under 8-connectivity
    masks[1, 12:15, 1:3] = True
    masks[1, 8, 12] = True  # single-pixel region
    masks[2, 6:10, 6:10] = True
    masks[2, 0:2, 13:16] = True
    # masks[3] stays empty: a good image whose pixels all count as normal.
    rng = np.random.default_rng(seed)
    noise = scipy.ndimage.gaussian_filter(
        rng.normal(size=masks.shape), sigma=(0, 1.0, 1.0)
    )
    maps = noise + 0.8 * scipy.ndimage.gaussian_filter(
        masks.astype(float), sigma=(0, 1.0, 1.0)
    )
    maps += 0.1 * rng.normal(size=masks.shape)
    if decimals is not None:
        maps = np.round(maps, decimals)
    return masks, maps


# --------------------------------------------------------------------------------
# Naive oracles
# --------------------------------------------------------------------------------


def _naive_pro_curve(masks, maps):
    """One (FPR, PRO) point per distinct score, computed from boolean masks."""
    regions = []
    for i, mask in enumerate(masks):
        labelled = measure.label(mask, connectivity=2)
        regions += [(i, labelled == k) for k in range(1, labelled.max() + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        positive = maps >= threshold
        pro = np.mean([positive[i][region].mean() for i, region in regions])
        fpr = (positive & normal).sum() / normal.sum()
        points.append((min(fpr, 1.0), min(pro, 1.0)))
    points.append((1.0, 1.0))
    return points


def _naive_truncated_area(points, limit):
    """Area under the polyline up to x = limit, cutting the crossing segment."""
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        if x1 <= limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        elif x0 < limit:
            y_at_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_at_limit) * (limit - x0)
            break
        else:
            break
    return area


def _naive_aupro(masks, maps, limit=0.3):
    return _naive_truncated_area(_naive_pro_curve(masks, maps), limit) / limit


def _naive_rd4ad_compute_pro(mask, amap, num_th=200):
    """RD4AD/ReContrast ``compute_pro`` on one image, one threshold at a time."""
    regions = measure.regionprops(measure.label(mask))
    inverse_mask = 1 - mask
    rows = []
    low, high = amap.min(), amap.max()
    for threshold in np.arange(low, high, (high - low) / num_th):
        binary = amap > threshold
        pros = [binary[r.coords[:, 0], r.coords[:, 1]].sum() / r.area for r in regions]
        fpr = np.logical_and(inverse_mask, binary).sum() / inverse_mask.sum()
        rows.append((statistics.mean(pros), fpr))
    pro, fpr = np.array(rows).T
    kept = fpr < 0.3
    return sklearn.metrics.auc(fpr[kept] / fpr[kept].max(), pro[kept])


# --------------------------------------------------------------------------------
# ROC / PR metrics vs scikit-learn
# --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,decimals", BINARY_CASES)
def test_auroc_matches_sklearn(seed, decimals):
    labels, scores = _random_binary_data(seed, decimals=decimals)
    expected = sklearn.metrics.roc_auc_score(labels, scores)
    assert metrics.auroc(labels, scores) == pytest.approx(
        expected, rel=1e-12, abs=1e-15
    )


@pytest.mark.parametrize("seed,decimals", BINARY_CASES)
def test_average_precision_matches_sklearn(seed, decimals):
    labels, scores = _random_binary_data(seed, decimals=decimals)
    expected = sklearn.metrics.average_precision_score(labels, scores)
    assert metrics.average_precision(labels, scores) == pytest.approx(
        expected, rel=1e-12
    )


@pytest.mark.parametrize("seed,decimals", BINARY_CASES)
def test_precision_recall_curve_matches_sklearn(seed, decimals):
    labels, scores = _random_binary_data(seed, decimals=decimals)
    precision, recall, thresholds = metrics.precision_recall_curve(labels, scores)
    ref_precision, ref_recall, ref_thresholds = sklearn.metrics.precision_recall_curve(
        labels, scores
    )
    np.testing.assert_array_equal(thresholds, ref_thresholds)
    np.testing.assert_allclose(precision, ref_precision, rtol=1e-15)
    np.testing.assert_allclose(recall, ref_recall, rtol=1e-15)
    assert (precision[-1], recall[-1]) == (1.0, 0.0)


@pytest.mark.parametrize("seed,decimals", BINARY_CASES)
def test_f1_max_matches_sklearn_f1_scores(seed, decimals):
    labels, scores = _random_binary_data(seed, decimals=decimals)
    f1, threshold = metrics.f1_max(labels, scores)
    ref_f1 = max(
        sklearn.metrics.f1_score(labels, scores >= t) for t in np.unique(scores)
    )
    assert f1 == pytest.approx(ref_f1, rel=1e-12)
    assert sklearn.metrics.f1_score(labels, scores >= threshold) == pytest.approx(
        ref_f1, rel=1e-12
    )


def test_auroc_on_hand_computed_ties():
    # Pairs (pos, neg): (0.9 vs 0.5) wins, (0.5 vs 0.5) ties -> (1 + 0.5) / 2.
    assert metrics.auroc([1, 0, 1], [0.9, 0.5, 0.5]) == 0.75


def test_auroc_rejects_single_class():
    with pytest.raises(ValueError, match="one class"):
        metrics.auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one class"):
        metrics.auroc(np.zeros(4, dtype=bool), np.arange(4.0))


def test_metrics_reject_bad_inputs():
    with pytest.raises(ValueError, match="only 0 and 1"):
        metrics.auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="same number"):
        metrics.auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="no positive"):
        metrics.average_precision([0, 0], [0.1, 0.2])


@pytest.mark.parametrize("seed,decimals", BINARY_CASES)
def test_f1_accuracy_at_best_threshold_matches_recontrast_protocol(seed, decimals):
    labels, scores = _random_binary_data(seed, size=200, decimals=decimals)
    # ReContrast utils.return_best_thr + evaluation_noseg, with sklearn.
    precs, recs, thrs = sklearn.metrics.precision_recall_curve(labels, scores)
    f1s = (2 * precs * recs / (precs + recs + 1e-7))[:-1]
    best_threshold = thrs[np.argmax(f1s)]
    result = metrics.f1_accuracy_at_best_threshold(labels, scores)
    assert result["threshold"] == best_threshold
    predictions = scores >= best_threshold
    assert result["accuracy"] == pytest.approx(
        sklearn.metrics.accuracy_score(labels, predictions), rel=1e-15
    )
    assert result["f1"] == pytest.approx(
        sklearn.metrics.f1_score(labels, predictions), rel=1e-12
    )


def test_classification_metrics_matches_sklearn():
    labels, scores = _random_binary_data(7, size=120, decimals=1)
    result = metrics.classification_metrics(labels, scores)
    assert set(result) == {
        "image_auroc",
        "image_ap",
        "image_f1_max",
        "f1",
        "accuracy",
        "threshold",
    }
    assert result["image_auroc"] == pytest.approx(
        sklearn.metrics.roc_auc_score(labels, scores), rel=1e-12
    )
    assert result["image_ap"] == pytest.approx(
        sklearn.metrics.average_precision_score(labels, scores), rel=1e-12
    )
    assert all(isinstance(value, float) for value in result.values())


# --------------------------------------------------------------------------------
# Standard MVTec AU-PRO
# --------------------------------------------------------------------------------


@pytest.mark.parametrize("decimals", [None, 2, 1])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_naive_reference(decimals, limit):
    masks, maps = _toy_stack(decimals=decimals)
    expected = _naive_aupro(masks, maps, limit)
    assert metrics.aupro(masks, maps, fpr_limit=limit) == pytest.approx(
        expected, rel=1e-9, abs=1e-12
    )


@pytest.mark.parametrize("decimals", [None, 1])
def test_pro_curve_matches_naive_curve(decimals):
    masks, maps = _toy_stack(decimals=decimals, seed=5)
    fpr, pro = metrics.pro_curve(masks, maps)
    expected_fpr, expected_pro = np.array(_naive_pro_curve(masks, maps)).T
    np.testing.assert_allclose(fpr, expected_fpr, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(pro, expected_pro, rtol=1e-12, atol=1e-15)


def test_aupro_counts_good_image_pixels_as_normal():
    masks, maps = _toy_stack(decimals=2, seed=3)
    maps[3] += 0.5  # a good image with high scores must lower the AU-PRO
    expected = _naive_aupro(masks, maps)
    assert metrics.aupro(masks, maps) == pytest.approx(expected, rel=1e-9)
    assert metrics.aupro(masks, maps) < metrics.aupro(masks[:3], maps[:3])


def test_aupro_accepts_int_masks():
    masks, maps = _toy_stack(decimals=2)
    assert metrics.aupro(masks.astype(np.uint8) * 255, maps) == pytest.approx(
        _naive_aupro(masks, maps), rel=1e-9
    )


def test_aupro_perfect_map_is_one():
    masks, _ = _toy_stack()
    assert metrics.aupro(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-15)


def test_aupro_known_ranking_hits_limit_exactly():
    # One row, one 4-pixel region A and 10 normal pixels N, ranked by score as
    # A N A N A N A N N N N N N N. Curve: (0,.25) (.1,.25) (.1,.5) (.2,.5)
    # (.2,.75) (.3,.75) (.3,1) ...; area to 0.3 = .1 * (.25 + .5 + .75) = .15.
    kinds = "ANANANANNNNNNN"
    masks = np.array([[[kind == "A" for kind in kinds]]])
    maps = np.arange(len(kinds), 0, -1, dtype=float)[None, None, :]
    assert metrics.aupro(masks, maps) == pytest.approx(0.15 / 0.3, rel=1e-12)


def test_aupro_fpr_jumps_past_limit_in_one_step():
    # 10 normal pixels, one 2-pixel region. Scores: region pixel 1.0; five
    # normals and the other region pixel tied at 0.8; other normals 0.1.
    # Curve: (0,0) (0,.5) (.5,1) (1,1): PRO at .3 interpolates to .8, so the
    # area is .5 * (.5 + .8) * .3 and AU-PRO = .65.
    masks = np.zeros((1, 1, 12), dtype=bool)
    masks[0, 0, :2] = True
    maps = np.full((1, 1, 12), 0.1)
    maps[0, 0, 0] = 1.0
    maps[0, 0, 1:7] = 0.8
    assert metrics.aupro(masks, maps) == pytest.approx(0.65, rel=1e-12)


def test_aupro_reaches_limit_only_at_end_point():
    # All normal pixels share the lowest score, so FPR stays 0 until the last
    # real point, which coincides with the (1, 1) end point: the value at 0.3 is
    # interpolated between (0, .5) and (1, 1). Regions: A = 2 pixels (0.9, 0.8),
    # B = 1 pixel tied with the normals. Points (0,.25) (0,.5) (1,1):
    # y(.3) = .65, area = .5 * (.5 + .65) * .3, AU-PRO = .575.
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[0, 0, :2] = True
    masks[1, 2, 2] = True
    maps = np.zeros((2, 3, 3))
    maps[0, 0, 0], maps[0, 0, 1] = 0.9, 0.8
    assert metrics.aupro(masks, maps) == pytest.approx(0.575, rel=1e-12)
    assert metrics.aupro(masks, maps) == pytest.approx(
        _naive_aupro(masks, maps), rel=1e-12
    )


def test_aupro_rejects_degenerate_masks():
    _, maps = _toy_stack()
    with pytest.raises(ValueError, match="no anomalous pixel"):
        metrics.aupro(np.zeros(maps.shape, dtype=bool), maps)
    with pytest.raises(ValueError, match="no normal pixel"):
        metrics.aupro(np.ones(maps.shape, dtype=bool), maps)
    with pytest.raises(ValueError, match="same shape"):
        metrics.aupro(np.ones((4, 16, 15), dtype=bool), maps)
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(np.ones(maps.shape, dtype=bool), maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="empty"):
        metrics.aupro(np.zeros((0, 4, 4), dtype=bool), np.zeros((0, 4, 4)))


# --------------------------------------------------------------------------------
# ReContrast / RD4AD per-image AU-PRO
# --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,decimals", [(0, None), (1, None), (2, 2)])
def test_aupro_recontrast_per_image_matches_naive_reference(seed, decimals):
    masks, maps = _toy_stack(decimals=decimals, seed=seed)
    # ReContrast evaluates anomalous images only, one image at a time.
    expected = np.mean(
        [_naive_rd4ad_compute_pro(masks[i].astype(int), maps[i]) for i in range(3)]
    )
    assert metrics.aupro_recontrast_per_image(masks, maps) == pytest.approx(
        expected, rel=1e-12
    )


def test_aupro_recontrast_per_image_scores_on_threshold_grid():
    # Half-integer maps spanning exactly [0, 200]: the 200 thresholds are the
    # exact integers 0..199, so many scores equal a threshold and "map > th"
    # (not >=) matters. (With integer-only scores ">=" would merely shift rows.)
    masks, maps = _toy_stack(seed=4)
    low = maps.min(axis=(1, 2), keepdims=True)
    high = maps.max(axis=(1, 2), keepdims=True)
    maps = np.round((maps - low) / (high - low) * 400) / 2
    expected = np.mean(
        [_naive_rd4ad_compute_pro(masks[i].astype(int), maps[i]) for i in range(3)]
    )
    assert metrics.aupro_recontrast_per_image(masks, maps) == pytest.approx(
        expected, rel=1e-12
    )


def test_aupro_recontrast_per_image_fpr_exactly_at_limit_is_dropped():
    # 10 normal pixels at .05, .15, ..., .95 and a 3-pixel region at 1, .9, .7.
    # For thresholds in [.65, .75) exactly 3 normals exceed: FPR == 0.3, and
    # those rows must be dropped ("fpr < 0.3"). Kept rows, FPR divided by .2:
    # (1, 2/3) (.5, 2/3) (.5, 1/3) (0, 1/3) -> area 1/3 + 1/6 = .5.
    masks = np.zeros((1, 1, 13), dtype=bool)
    masks[0, 0, 10:] = True
    maps = np.concatenate([np.arange(10) / 10 + 0.05, [1.0, 0.9, 0.7]])[None, None, :]
    expected = _naive_rd4ad_compute_pro(masks[0].astype(int), maps[0])
    assert expected == pytest.approx(0.5, rel=1e-12)
    assert metrics.aupro_recontrast_per_image(masks, maps) == pytest.approx(
        0.5, rel=1e-12
    )


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_aupro_recontrast_per_image_constant_map_scores_zero():
    masks, maps = _toy_stack()
    maps[1] = 0.7  # the reference cannot evaluate this image (arange step 0)
    with pytest.raises((ValueError, ZeroDivisionError)):
        _naive_rd4ad_compute_pro(masks[1].astype(int), maps[1])
    expected = (
        _naive_rd4ad_compute_pro(masks[0].astype(int), maps[0])
        + 0.0
        + _naive_rd4ad_compute_pro(masks[2].astype(int), maps[2])
    ) / 3
    assert metrics.aupro_recontrast_per_image(masks, maps) == pytest.approx(
        expected, rel=1e-12
    )


def test_aupro_recontrast_per_image_single_kept_row_scores_zero():
    # Scores k / 99 for k = 0..99, the top pixel being the only anomalous one.
    # Thresholds 0, .25, .5, .75: only th = .75 has FPR = 24 / 99 < 0.3, and the
    # reference's sklearn.metrics.auc refuses a single point.
    masks = np.zeros((1, 10, 10), dtype=bool)
    masks[0, 9, 9] = True
    maps = np.linspace(0.0, 1.0, 100).reshape(1, 10, 10)
    with pytest.raises(ValueError, match="At least 2 points"):
        _naive_rd4ad_compute_pro(masks[0].astype(int), maps[0], num_th=4)
    assert metrics.aupro_recontrast_per_image(masks, maps, num_thresholds=4) == 0.0


def test_aupro_recontrast_per_image_rejects_all_good():
    _, maps = _toy_stack()
    with pytest.raises(ValueError, match="no mask"):
        metrics.aupro_recontrast_per_image(np.zeros(maps.shape, dtype=bool), maps)


# --------------------------------------------------------------------------------
# Segmentation bundle
# --------------------------------------------------------------------------------


def test_segmentation_metrics_matches_oracles():
    masks, maps = _toy_stack(decimals=2)
    image_scores = maps.reshape(4, -1).max(axis=1)
    result = metrics.segmentation_metrics(masks, maps, image_scores)
    image_labels = [1, 1, 1, 0]
    pixel_labels, pixel_scores = masks.ravel(), maps.ravel()
    expected = {
        "image_auroc": sklearn.metrics.roc_auc_score(image_labels, image_scores),
        "pixel_auroc": sklearn.metrics.roc_auc_score(pixel_labels, pixel_scores),
        "image_ap": sklearn.metrics.average_precision_score(image_labels, image_scores),
        "pixel_ap": sklearn.metrics.average_precision_score(pixel_labels, pixel_scores),
        "image_f1_max": max(
            sklearn.metrics.f1_score(image_labels, image_scores >= t)
            for t in image_scores
        ),
        "pixel_f1_max": max(
            sklearn.metrics.f1_score(pixel_labels, pixel_scores >= t)
            for t in np.unique(pixel_scores)
        ),
        "aupro": _naive_aupro(masks, maps),
        "aupro_recontrast_per_image": np.mean(
            [_naive_rd4ad_compute_pro(masks[i].astype(int), maps[i]) for i in range(3)]
        ),
    }
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert isinstance(result[key], float), key
        assert result[key] == pytest.approx(value, rel=1e-9), key
