"""Post-processing: soft-NMS against a scalar reference loop, hard NMS against torchvision, the
official settings against a transcription of the released evaluation, and multi-scale merging."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

import m2det
from m2det.boxes.coder import BoxCoder
from m2det.boxes.nms import batched_soft_nms, soft_nms
from m2det.boxes.postprocess import (
    OFFICIAL,
    PAPER,
    Candidates,
    PostProcessor,
    PostprocessSettings,
    get_settings,
    top_k_per_group,
)

F32 = np.float32


def reference_soft_nms(dets, sigma=0.5, nt=0.3, floor=0.001, method="linear", offset=0.0):
    """The classic Bodla et al. loop over an `[n, 5]` float32 array (x1, y1, x2, y2, score), scalar by
    scalar in float32: pick the max, move it to the front, decay the rest, drop those under the floor
    by swapping in the last box. Returns the first N rows (the kept boxes, in selection order)."""
    b = np.array(dets, dtype=F32).copy()
    n = len(b)
    sigma, nt, floor, off, one = F32(sigma), F32(nt), F32(floor), F32(offset), F32(1)
    for i in range(len(b)):  # the bound is fixed when the loop starts, as in the compiled original
        if i >= n:
            break
        maxpos = i + int(np.argmax(b[i:n, 4]))  # first maximum, like the strict '<' scan
        b[[i, maxpos]] = b[[maxpos, i]]
        tx1, ty1, tx2, ty2 = b[i, :4]
        pos = i + 1
        while pos < n:
            x1, y1, x2, y2 = b[pos, :4]
            area = (x2 - x1 + off) * (y2 - y1 + off)
            iw = min(tx2, x2) - max(tx1, x1) + off
            if iw > 0:
                ih = min(ty2, y2) - max(ty1, y1) + off
                if ih > 0:
                    ua = F32((tx2 - tx1 + off) * (ty2 - ty1 + off) + area - iw * ih)
                    ov = F32(iw * ih / ua)
                    if method == "linear":
                        weight = one - ov if ov > nt else one
                    else:
                        weight = F32(np.exp(np.float64(-(ov * ov) / sigma)))
                    b[pos, 4] = F32(weight * b[pos, 4])
                    if b[pos, 4] < floor:
                        b[pos] = b[n - 1]
                        n -= 1
                        pos -= 1
            pos += 1
    return b[:n]


def random_boxes(n, seed, clusters=4, size=100.0):
    """Boxes jittered around a few centres so that many overlap, with distinct random scores."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(clusters, 2, generator=g) * size
    which = torch.randint(0, clusters, (n,), generator=g)
    xy = centres[which] + torch.randn(n, 2, generator=g) * 6
    wh = 10 + torch.rand(n, 2, generator=g) * 30
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], dim=1)
    return boxes, torch.rand(n, generator=g) * 0.9 + 0.05


def as_rows(boxes, scores):
    """Detections as a set of (x1, y1, x2, y2, score) tuples, for order-free comparison."""
    return sorted(map(tuple, torch.cat([boxes, scores[:, None]], dim=1).tolist()))


def check_against_reference(boxes, scores, method, offset=0.0, sigma=0.5, nt=0.3):
    keep, new_scores = soft_nms(boxes, scores, method=method, sigma=sigma, iou_threshold=nt, offset=offset)
    expected = reference_soft_nms(
        torch.cat([boxes, scores[:, None]], 1).numpy(), sigma=sigma, nt=nt, method=method, offset=offset
    )
    assert as_rows(boxes[keep], new_scores) == sorted(map(tuple, expected.tolist()))
    # kept in non-increasing score order
    assert torch.all(new_scores[:-1] >= new_scores[1:])
    return keep, new_scores


@pytest.mark.parametrize("method", ["linear", "gaussian"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_nms_matches_reference_on_random_boxes(method, offset, seed):
    boxes, scores = random_boxes(60, seed)
    keep, new_scores = check_against_reference(boxes, scores, method, offset)
    assert 0 < len(keep) <= 60
    # the decay really happened somewhere: some kept scores differ from the input ones
    assert not torch.equal(new_scores, scores[keep])


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_adversarial_inputs(method):
    box = torch.tensor([[10.0, 10.0, 50.0, 60.0]])
    # identical boxes with identical scores: every copy decays against the first
    check_against_reference(box.repeat(8, 1), torch.full((8,), 0.7), method)
    # identical boxes, distinct scores
    check_against_reference(box.repeat(8, 1), torch.linspace(0.2, 0.9, 8), method)
    # all boxes overlapping heavily (nested)
    nested = torch.stack([torch.tensor([10.0 - i, 10.0 - i, 50.0 + i, 60.0 + i]) for i in range(10)])
    check_against_reference(nested, torch.linspace(0.9, 0.3, 10), method)
    # a single box comes back untouched
    keep, new_scores = check_against_reference(box, torch.tensor([0.4]), method)
    assert keep.tolist() == [0] and new_scores.tolist() == [pytest.approx(0.4)]
    # no boxes
    keep, new_scores = soft_nms(torch.zeros(0, 4), torch.zeros(0), method=method)
    assert keep.shape == (0,) and new_scores.shape == (0,)


def test_linear_soft_nms_drops_identical_boxes_and_keeps_disjoint_ones():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]])
    keep, new_scores = soft_nms(boxes, torch.tensor([0.9, 0.8, 0.5]), method="linear")
    # IoU 1 -> weight 0 -> under the floor
    assert keep.tolist() == [0, 2]
    assert new_scores.tolist() == pytest.approx([0.9, 0.5])


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_batched_soft_nms_equals_per_group_reference(method):
    boxes, scores = random_boxes(120, seed=5, clusters=3)
    groups = torch.randint(0, 5, (120,), generator=torch.Generator().manual_seed(1)) * 7  # sparse ids
    keep, new_scores = batched_soft_nms(boxes, scores, groups, method=method)
    got = sorted(
        (int(groups[k]), *box, score)
        for k, box, score in zip(keep, boxes[keep].tolist(), new_scores.tolist())
    )
    expected = []
    for g in groups.unique().tolist():
        mine = groups == g
        ref = reference_soft_nms(torch.cat([boxes[mine], scores[mine, None]], 1).numpy(), method=method)
        expected += [(g, *row) for row in ref.tolist()]
    assert got == sorted(expected)
    assert len(set(groups[keep].tolist())) == 5


def test_max_per_group_equals_the_first_picks_of_a_full_run():
    boxes, scores = random_boxes(80, seed=3)
    groups = torch.arange(80) % 3
    full_keep, full_scores = batched_soft_nms(boxes, scores, groups)
    keep, new_scores = batched_soft_nms(boxes, scores, groups, max_per_group=4)
    expected = torch.cat([full_keep[groups[full_keep] == g][:4] for g in range(3)])
    assert sorted(keep.tolist()) == sorted(expected.tolist())
    assert torch.equal(new_scores, full_scores[torch.isin(full_keep, keep)])


def test_top_k_per_group():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.8])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    assert top_k_per_group(scores, groups, 2).tolist() == [False, True, True, True, False, True]


def random_predictions(num_images=2, anchors=300, classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(num_images, anchors, 4, generator=g) * 0.5
    logits = torch.randn(num_images, anchors, classes, generator=g) * 2.5
    centers = torch.rand(anchors, 2, generator=g) * 0.6 + 0.2
    anchor_boxes = torch.cat([centers, torch.rand(anchors, 2, generator=g) * 0.3 + 0.05], dim=1)
    return loc, logits, anchor_boxes


def test_hard_nms_equals_torchvision_batched_nms():
    loc, logits, anchors = random_predictions()
    sizes = [(240, 320), (100, 90)]
    settings = PAPER.replace(nms="hard", max_per_class=None, max_per_image=None)
    post = PostProcessor(BoxCoder(), settings)
    out = post(loc, logits, anchors, sizes)
    boxes, probs = post.decode(loc, logits, anchors, sizes)
    for i, (h, w) in enumerate(sizes):
        b = BoxCoder().decode(loc[i], anchors) * torch.tensor([w, h, w, h])
        b = torch.minimum(b.clamp(min=0), torch.tensor([w, h, w, h]))
        assert torch.equal(boxes[i], b)
        p = logits[i].softmax(-1)[:, 1:]
        anchor, cls = (p > PAPER.score_threshold).nonzero(as_tuple=True)
        keep = batched_nms(b[anchor], p[anchor, cls], cls, settings.iou_threshold)
        assert len(keep) > 10
        assert as_rows(out[i]["boxes"], out[i]["scores"]) == as_rows(b[anchor][keep], p[anchor, cls][keep])
        assert sorted(out[i]["labels"].tolist()) == sorted((cls[keep] + 1).tolist())


def test_official_settings_on_a_hand_made_case():
    # "+1" areas: A spans 10 x 10 pixels, B 10 x 5, their intersection 10 x 5 -> IoU 0.5 exactly,
    # so B decays by 1 - 0.5 to 0.4. With plain areas the IoU would be 36 / 81 and B would keep 0.4444.
    boxes = torch.tensor([[0.0, 0, 9, 9], [0, 0, 9, 4], [20, 20, 29, 29], [0, 0, 9, 9]])
    found = Candidates(
        image_index=torch.tensor([0, 0, 0, 0]),
        boxes=boxes,
        scores=torch.tensor([0.9, 0.8, 0.3, 0.6]),
        labels=torch.tensor([1, 1, 1, 2]),
    )
    (out,) = PostProcessor(BoxCoder(), OFFICIAL).suppress(found, 1)
    assert torch.equal(out["scores"], torch.tensor([0.9, 0.6, 0.4, 0.3]))
    assert torch.equal(out["boxes"], boxes[[0, 3, 1, 2]])
    assert out["labels"].tolist() == [1, 2, 1, 1]
    (paper,) = PostProcessor(BoxCoder(), PAPER).suppress(found, 1)
    assert paper["scores"][2].item() == pytest.approx(0.8 * (1 - 36 / 81), abs=1e-6)


@pytest.mark.parametrize("settings", [OFFICIAL, PAPER])
def test_boxes_that_overflow_are_no_detections(settings):
    # offsets far outside the trained range (random weights): exp overflows to inf, and the
    # corner arithmetic turns inf - inf into NaN; such a box must not become a detection
    anchors = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.6, 0.6], [0.3, 0.3, 0.4, 0.4]])
    loc = torch.tensor([[[0.0, 0.0, 1e4, 0.0], [0.0, 0.0, 0.0, 0.0], [float("nan"), 0.0, 0.0, 0.0]]])
    logits = torch.tensor([[[0.0, 5.0], [0.0, 4.0], [0.0, 6.0]]])
    (out,) = PostProcessor(BoxCoder(), settings)(loc, logits, anchors, [(100, 200)])
    assert out["boxes"].shape == (1, 4) and torch.isfinite(out["boxes"]).all()
    expected, _ = PostProcessor(BoxCoder(), settings).decode(
        loc[:, 1:2], logits[:, 1:2], anchors[1:2], [(100, 200)]
    )
    assert torch.equal(out["boxes"], expected[0])


def test_official_boxes_are_not_clipped():
    anchors = torch.tensor([[0.1, 0.1, 0.5, 0.5]])
    loc, logits = torch.zeros(1, 1, 4), torch.tensor([[[0.0, 5.0]]])
    official, _ = PostProcessor(BoxCoder(), OFFICIAL).decode(loc, logits, anchors, [(100, 200)])
    paper, _ = PostProcessor(BoxCoder(), PAPER).decode(loc, logits, anchors, [(100, 200)])
    assert official[0, 0].tolist() == pytest.approx([-30.0, -15.0, 70.0, 35.0])
    assert paper[0, 0].tolist() == pytest.approx([0.0, 0.0, 70.0, 35.0])


def official_test_net(loc, logits, anchors, sizes, threshold=0.1, keep_per_class=50, top_k=0):
    """A transcription of the released evaluation: decode, scale by (w, h), per class `> threshold`,
    cpu_soft_nms(method=1, sigma=0.45), first 50, then, only when `top_k > 0` (the released configs
    set 0), the per-image cut at the `top_k`-th best score."""
    results = []
    for i, (h, w) in enumerate(sizes):
        deltas, p = loc[i], logits[i].softmax(-1)
        cxcy = anchors[:, :2] + deltas[:, :2] * 0.1 * anchors[:, 2:]
        wh = anchors[:, 2:] * torch.exp(deltas[:, 2:] * 0.2)
        x1y1 = cxcy - wh / 2
        boxes = torch.cat([x1y1, x1y1 + wh], 1) * torch.tensor([w, h, w, h], dtype=torch.float32)
        per_class = {}
        for j in range(1, p.shape[1]):
            inds = np.where(p[:, j].numpy() > threshold)[0]
            if len(inds) == 0:
                continue
            dets = np.hstack([boxes[inds].numpy(), p[inds, j].numpy()[:, None]]).astype(F32)
            per_class[j] = reference_soft_nms(dets, sigma=0.45, nt=0.3, floor=0.001, offset=1.0)[
                :keep_per_class
            ]
        all_scores = np.concatenate([d[:, 4] for d in per_class.values()]) if per_class else np.zeros(0)
        if top_k > 0 and len(all_scores) > top_k:
            cut = np.sort(all_scores)[-top_k]
            per_class = {j: d[d[:, 4] >= cut] for j, d in per_class.items()}
        results.append(sorted((j, *row) for j, d in per_class.items() for row in d.tolist()))
    return results


def result_rows(result):
    return sorted(
        (label, *box, score)
        for label, box, score in zip(
            result["labels"].tolist(), result["boxes"].tolist(), result["scores"].tolist()
        )
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_official_settings_reproduce_the_released_evaluation(seed):
    loc, logits, anchors = random_predictions(anchors=400, classes=5, seed=seed)
    sizes = [(375, 500), (480, 640)]
    expected = official_test_net(loc, logits, anchors, sizes, keep_per_class=20, top_k=50)
    # with caps small enough to bite (the released code's rule for a positive topk)
    capped = PostProcessor(BoxCoder(), OFFICIAL.replace(max_per_class=20, max_per_image=50))
    for got, want in zip(capped(loc, logits, anchors, sizes), expected):
        rows = result_rows(got)
        assert rows == want and len(rows) >= 50


def test_official_settings_keep_every_detection_of_an_image_like_the_released_configs():
    # 20 classes of 400 spread-out anchors: far more than 300 detections survive per image
    loc, logits, anchors = random_predictions(num_images=1, anchors=400, classes=21, seed=4)
    sizes = [(480, 640)]
    (official,) = PostProcessor(BoxCoder(), "official")(loc, logits, anchors, sizes)
    (want,) = official_test_net(loc, logits, anchors, sizes)  # topk = 0: no per-image cut
    assert len(want) > 300 and result_rows(official) == want
    (paper,) = PostProcessor(BoxCoder(), PAPER)(loc, logits, anchors, sizes)
    assert len(paper["scores"]) == PAPER.max_per_image == 300


def test_min_score_drops_what_soft_nms_decays_below_it():
    # B covers half of A (IoU 0.5): linear soft-NMS decays its 0.5 to 0.25, under a floor of 0.3
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 30]])
    found = Candidates(
        image_index=torch.zeros(3, dtype=torch.int64),
        boxes=boxes,
        scores=torch.tensor([0.9, 0.5, 0.35]),
        labels=torch.ones(3, dtype=torch.int64),
    )
    (kept_all,) = PostProcessor(BoxCoder(), PAPER.replace(score_threshold=0.3)).suppress(found, 1)
    assert kept_all["scores"].tolist() == pytest.approx([0.9, 0.35, 0.25])
    floor = PAPER.replace(score_threshold=0.3, min_score=0.3)
    (floored,) = PostProcessor(BoxCoder(), floor).suppress(found, 1)
    assert floored["scores"].tolist() == pytest.approx([0.9, 0.35])
    assert torch.equal(floored["boxes"], boxes[[0, 2]])
    # a floor on a score that is met exactly keeps the box
    (exact,) = PostProcessor(BoxCoder(), floor.replace(min_score=0.35)).suppress(found, 1)
    assert exact["scores"].tolist() == pytest.approx([0.9, 0.35])
    with pytest.raises(ValueError, match="min_score"):
        PAPER.replace(min_score=1.5)


def test_settings_lookup_and_validation():
    assert get_settings("official") is OFFICIAL and get_settings(" Paper ") is PAPER
    assert PAPER.score_threshold == 0.05 and PAPER.nms == "linear" and not PAPER.plus_one
    assert OFFICIAL.score_threshold == 0.1 and OFFICIAL.plus_one and OFFICIAL.max_per_class == 50
    assert OFFICIAL.max_per_image is None and PAPER.max_per_image == 300
    assert OFFICIAL.replace(nms="hard").iou_threshold == 0.45
    with pytest.raises(ValueError, match="unknown post-processing settings"):
        get_settings("fast")
    with pytest.raises(ValueError, match="nms must be one of"):
        PostprocessSettings(nms="soft")
    with pytest.raises(ValueError, match="score_threshold"):
        PostprocessSettings(score_threshold=2)


def test_model_forward_returns_detections_with_names():
    model = m2det.build_model("m2det_tiny", num_classes=4, class_names=["a", "b", "c"]).eval()
    model.set_postprocess(PAPER.replace(score_threshold=0.2))
    images = [torch.rand(3, 120, 160), torch.randint(0, 255, (3, 90, 70), dtype=torch.uint8)]
    with torch.inference_mode():
        out = model(images)
    assert len(out) == 2
    for result, (h, w) in zip(out, [(120, 160), (90, 70)]):
        assert result["boxes"].dtype == torch.float32 and result["labels"].dtype == torch.int64
        assert len(result["boxes"]) > 0
        assert (result["boxes"][:, 0::2] <= w).all() and (result["boxes"][:, 1::2] <= h).all()
        # soft-NMS may decay a score below the threshold, never below the floor
        assert (result["scores"] >= PAPER.score_floor).all()
        assert torch.all(result["scores"][:-1] >= result["scores"][1:])
        assert result["label_names"] == [["a", "b", "c"][i - 1] for i in result["labels"].tolist()]
    model.set_postprocess("official")
    assert model.postprocessor.settings is OFFICIAL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_postprocessing_on_gpu_equals_cpu():
    loc, logits, anchors = random_predictions(seed=3)
    sizes = [(240, 320), (100, 90)]
    for settings in (PAPER, OFFICIAL, PAPER.replace(nms="gaussian"), PAPER.replace(nms="hard")):
        post = PostProcessor(BoxCoder(), settings)
        cpu = post(loc, logits, anchors, sizes)
        gpu = post(loc.cuda(), logits.cuda(), anchors.cuda(), sizes)
        for a, b in zip(cpu, gpu):
            rows_cpu = torch.tensor(as_rows(a["boxes"], a["scores"]))
            rows_gpu = torch.tensor(as_rows(b["boxes"].cpu(), b["scores"].cpu()))
            assert rows_cpu.shape == rows_gpu.shape and torch.allclose(rows_cpu, rows_gpu, atol=1e-3)


def test_per_image_cap_exact_or_keeping_ties():
    found = Candidates(
        image_index=torch.zeros(5, dtype=torch.int64),
        boxes=torch.tensor([[0.0, 0, 10, 10]]).repeat(5, 1),
        scores=torch.tensor([0.5, 0.8, 0.9, 0.8, 0.8]),
        labels=torch.arange(1, 6),  # one class each: no suppression
    )
    (exact,) = PostProcessor(BoxCoder(), PAPER.replace(max_per_image=2)).suppress(found, 1)
    assert exact["scores"].tolist() == pytest.approx([0.9, 0.8]) and exact["labels"].tolist() == [3, 2]
    (ties,) = PostProcessor(BoxCoder(), OFFICIAL.replace(max_per_image=2)).suppress(found, 1)
    assert ties["scores"].tolist() == pytest.approx([0.9, 0.8, 0.8, 0.8])


def test_pre_nms_top_k_keeps_the_best_k_per_class_and_image_before_nms():
    """Worked by hand. Image 0, class 1: A 0.9 and B 0.8 overlap (IoU 0.9), C 0.7 and D 0.5 stand
    apart; class 2: E 0.6 alone. Image 1, class 1: three disjoint boxes 0.3, 0.2, 0.1.
    With top-2 before NMS, class 1 of image 0 keeps A and B, and NMS then drops B: only A remains
    (top-2 after NMS would have kept A and C). Image 1 keeps its two best, 0.3 and 0.2."""
    boxes = torch.tensor(
        [
            [0.0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30], [40, 40, 50, 50],  # A B C D
            [60, 60, 70, 70],  # E
            [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50],  # image 1
        ]
    )  # fmt: skip
    found = Candidates(
        image_index=torch.tensor([0, 0, 0, 0, 0, 1, 1, 1]),
        boxes=boxes,
        scores=torch.tensor([0.9, 0.8, 0.7, 0.5, 0.6, 0.1, 0.3, 0.2]),
        labels=torch.tensor([1, 1, 1, 1, 2, 1, 1, 1]),
    )
    plain = PostprocessSettings(nms="hard", iou_threshold=0.45, max_per_class=None, max_per_image=None)
    every = PostProcessor(BoxCoder(), plain).suppress(found, 2)
    assert every[0]["scores"].tolist() == pytest.approx([0.9, 0.7, 0.6, 0.5])  # NMS alone drops B
    top2 = PostProcessor(BoxCoder(), plain.replace(pre_nms_top_k=2)).suppress(found, 2)
    assert top2[0]["scores"].tolist() == pytest.approx([0.9, 0.6])
    assert top2[0]["labels"].tolist() == [1, 2]
    assert torch.equal(top2[0]["boxes"], boxes[[0, 4]])
    assert top2[1]["scores"].tolist() == pytest.approx([0.3, 0.2])
    assert torch.equal(top2[1]["boxes"], boxes[[6, 7]])
