"""Pascal VOC AP: hand-worked cases, difficult boxes, the pixel convention, and a devkit-literal reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from m2det.engine.voc_eval import mean_ap, voc_ap, voc_evaluate


def _evaluate(dets, gts, **kwargs):
    """dets: (image, box, score, label); gts: (image, box, label, difficult) -> per-label results."""
    return voc_evaluate(
        [d[0] for d in dets],
        [d[1] for d in dets],
        [d[2] for d in dets],
        [d[3] for d in dets],
        [g[0] for g in gts],
        [g[1] for g in gts],
        [g[2] for g in gts],
        [g[3] for g in gts],
        **kwargs,
    )


GT = [
    (0, [0, 0, 10, 10], 1, False),  # g1
    (0, [20, 20, 30, 30], 1, False),  # g2, never found
    (1, [0, 0, 10, 10], 1, False),  # g3
]


def test_hand_worked_three_gt_four_detections():
    dets = [
        (0, [0, 0, 10, 10], 0.9, 1),  # TP on g1          -> P 1/1, R 1/3
        (0, [50, 50, 60, 60], 0.8, 1),  # FP, no overlap  -> P 1/2, R 1/3
        (1, [0, 0, 10, 10], 0.7, 1),  # TP on g3          -> P 2/3, R 2/3
        (0, [0, 0, 10, 10], 0.6, 1),  # FP, g1 taken      -> P 2/4, R 2/3
    ]
    # given in shuffled order: the evaluation must sort by score itself
    result = _evaluate([dets[2], dets[0], dets[3], dets[1]], GT, pixel_inclusive=False)[1]
    assert result.num_gt == 3
    torch.testing.assert_close(result.recall, torch.tensor([1 / 3, 1 / 3, 2 / 3, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(result.precision, torch.tensor([1, 1 / 2, 2 / 3, 2 / 4], dtype=torch.float64))
    # 11-point: t = 0, .1, .2, .3 see precision 1; t = .4, .5, .6 see 2/3; t >= .7 nothing
    assert result.ap07 == pytest.approx((4 * 1 + 3 * (2 / 3)) / 11)
    # area: recall 0 -> 1/3 at precision 1, 1/3 -> 2/3 at 2/3
    assert result.ap == pytest.approx(1 / 3 * 1 + 1 / 3 * 2 / 3)


def test_ground_truth_against_itself_is_ap_one():
    gts = GT + [(1, [5, 5, 40, 30], 2, False)]
    dets = [(g[0], g[1], 1.0, g[2]) for g in gts]
    results = _evaluate(dets, gts)
    assert set(results) == {1, 2}
    for r in results.values():
        assert r.ap == pytest.approx(1.0) and r.ap07 == pytest.approx(1.0)
    assert mean_ap(results) == pytest.approx(1.0)


def test_difficult_boxes_are_neither_tp_nor_fp_nor_counted():
    hard = (1, [40, 40, 50, 50], 1, True)
    dets = [
        (1, [40, 40, 50, 50], 0.95, 1),  # on the difficult box: ignored
        (0, [0, 0, 10, 10], 0.9, 1),
        (1, [0, 0, 10, 10], 0.7, 1),
    ]
    with_difficult = _evaluate(dets, [*GT, hard], pixel_inclusive=False)[1]
    assert with_difficult.num_gt == 3 and with_difficult.num_detections == 2
    assert with_difficult.ap == pytest.approx(2 / 3)  # two of three found, precision 1 throughout
    # the same box, not difficult: now a fourth positive, and the top detection a true positive
    plain = _evaluate(dets, [*GT, (*hard[:3], False)], pixel_inclusive=False)[1]
    assert plain.num_gt == 4 and plain.ap == pytest.approx(3 / 4)
    # a second detection on the difficult box is ignored too, not a duplicate false positive
    near = (1, [41, 41, 50, 50], 0.99, 1)
    assert _evaluate([near, *dets], [*GT, hard], pixel_inclusive=False)[1].ap == pytest.approx(2 / 3)


def test_pixel_convention_flag_and_threshold_inclusive():
    gts = [(0, [0, 0, 9, 9], 1, False)]  # pixels 0..9: 10 x 10 in the devkit's convention
    dets = [(0, [0, 0, 4, 9], 0.5, 1)]  # pixels 0..4 x 0..9
    # devkit: 5*10 / (10*10) = 0.5 >= 0.5 -> TP; continuous: 4*9 / (9*9) = 0.44 -> FP
    assert _evaluate(dets, gts, pixel_inclusive=True)[1].ap == pytest.approx(1.0)
    assert _evaluate(dets, gts, pixel_inclusive=False)[1].ap == 0.0


def test_no_detections_and_no_ground_truth():
    results = _evaluate([], GT, labels=[1, 2])
    assert results[1].ap == 0.0 and results[1].ap07 == 0.0
    assert math.isnan(results[2].ap) and results[2].num_gt == 0
    assert mean_ap(results) == 0.0  # the class without ground truth is left out of the mean


def test_voc_ap_eleven_points_are_exact_tenths():
    # recall 3/10 reaches the t = 0.3 point (np.arange(0, 1.1, .1) would make it 0.30000000000000004)
    recall = torch.tensor([0.1, 0.2, 0.3])
    precision = torch.tensor([1.0, 1.0, 1.0])
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx(4 / 11)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="det_boxes"):
        voc_evaluate([0], [[0, 0, 1]], [1.0], [1], [0], [[0, 0, 1, 1]], [1])
    with pytest.raises(ValueError, match="gt_labels"):
        voc_evaluate([0], [[0, 0, 1, 1]], [1.0], [1], [0], [[0, 0, 1, 1]], [1, 2])


def _devkit_reference(dets, gts, label, threshold=0.5, plus_one=True):
    """A literal, loop-by-loop reading of VOCevaldet.m + VOCap for one class (independent of the code)."""
    extra = 1.0 if plus_one else 0.0
    gt_by_image = {}
    for image, box, lab, diff in gts:
        if lab == label:
            gt_by_image.setdefault(image, []).append([box, diff, False])
    npos = sum(not g[1] for boxes in gt_by_image.values() for g in boxes)
    mine = [d for d in dets if d[3] == label]
    order = sorted(range(len(mine)), key=lambda i: -mine[i][2])  # Python's sort is stable, as MATLAB's
    tp, fp = [], []
    for i in order:
        image, bb = mine[i][0], mine[i][1]
        ovmax, jmax = -math.inf, -1
        for j, (bbgt, _, _) in enumerate(gt_by_image.get(image, [])):
            iw = min(bb[2], bbgt[2]) - max(bb[0], bbgt[0]) + extra
            ih = min(bb[3], bbgt[3]) - max(bb[1], bbgt[1]) + extra
            if iw > 0 and ih > 0:
                ua = (
                    (bb[2] - bb[0] + extra) * (bb[3] - bb[1] + extra)
                    + (bbgt[2] - bbgt[0] + extra) * (bbgt[3] - bbgt[1] + extra)
                    - iw * ih
                )
                if iw * ih / ua > ovmax:
                    ovmax, jmax = iw * ih / ua, j
        if ovmax >= threshold:
            g = gt_by_image[image][jmax]
            if not g[1]:
                if not g[2]:
                    tp.append(1)
                    fp.append(0)
                    g[2] = True
                else:
                    tp.append(0)
                    fp.append(1)
            else:
                tp.append(0)
                fp.append(0)
        else:
            tp.append(0)
            fp.append(1)
    if npos == 0:
        return math.nan, math.nan  # the devkit divides by zero here; we report "undefined"
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap07 = sum((prec[rec >= t / 10].max() if (rec >= t / 10).any() else 0.0) for t in range(11)) / 11
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    changed = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    area = float(((mrec[changed] - mrec[changed - 1]) * mpre[changed]).sum())
    return ap07, area


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("plus_one", [True, False])
def test_matches_devkit_reference_on_random_data(plus_one, seed):
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for image in range(12):
        for _ in range(rng.integers(0, 6)):
            xy = rng.uniform(0, 80, 2)
            box = [*xy, *(xy + rng.uniform(5, 40, 2))]
            gts.append((image, [round(v) for v in box], int(rng.integers(1, 4)), bool(rng.random() < 0.15)))
        for _ in range(rng.integers(0, 9)):
            if gts and rng.random() < 0.6:  # jittered copies of ground truth, some duplicated
                g = gts[rng.integers(len(gts))]
                box = [v + rng.normal(0, 2) for v in g[1]]
                dets.append((g[0], box, float(rng.choice([0.3, 0.5, rng.random()])), g[2]))
            else:
                xy = rng.uniform(0, 80, 2)
                box = [*xy, *(xy + rng.uniform(5, 40, 2))]
                dets.append((image, box, float(rng.random()), int(rng.integers(1, 4))))
    results = _evaluate(dets, gts, pixel_inclusive=plus_one, labels=[1, 2, 3])
    for label in (1, 2, 3):
        ap07, area = _devkit_reference(dets, gts, label, plus_one=plus_one)
        assert results[label].ap07 == pytest.approx(ap07, abs=1e-12, nan_ok=True)
        assert results[label].ap == pytest.approx(area, abs=1e-12, nan_ok=True)
