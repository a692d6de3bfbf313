"""The SSD multibox loss: a hand-worked case, a per-anchor loop reference, matching rules, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import box_convert

import m2det
from m2det.boxes.coder import BoxCoder
from m2det.boxes.loss import MultiBoxLoss
from m2det.boxes.matcher import AnchorMatcher

# ----- an independent reference: plain numpy, one anchor at a time -----


def np_iou(box: np.ndarray, other: np.ndarray) -> float:
    w = min(box[2], other[2]) - max(box[0], other[0])
    h = min(box[3], other[3]) - max(box[1], other[1])
    inter = max(w, 0.0) * max(h, 0.0)
    area = (box[2] - box[0]) * (box[3] - box[1]) + (other[2] - other[0]) * (other[3] - other[1])
    return inter / (area - inter)


def np_encode(box: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    w, h = box[2] - box[0], box[3] - box[1]
    return np.array(
        [
            (cx - anchor[0]) / (0.1 * anchor[2]),
            (cy - anchor[1]) / (0.1 * anchor[3]),
            math.log(w / anchor[2]) / 0.2,
            math.log(h / anchor[3]) / 0.2,
        ]
    )


def np_smooth_l1(diff: np.ndarray) -> float:
    a = np.abs(diff)
    return float(np.where(a < 1, 0.5 * a * a, a - 0.5).sum())


def np_cross_entropy(row: np.ndarray, label: int) -> float:
    m = row.max()
    return float(m + math.log(np.exp(row - m).sum()) - row[label])


def reference_match(boxes: np.ndarray, labels: np.ndarray, anchors_cxcywh: np.ndarray, threshold=0.5):
    anchors_xyxy = np.concatenate(
        [
            anchors_cxcywh[:, :2] - anchors_cxcywh[:, 2:] / 2,
            anchors_cxcywh[:, :2] + anchors_cxcywh[:, 2:] / 2,
        ],
        axis=1,
    )
    num_anchors = len(anchors_xyxy)
    truth = [-1] * num_anchors
    overlap = [0.0] * num_anchors
    for a in range(num_anchors):
        for j in range(len(boxes)):
            iou = np_iou(boxes[j], anchors_xyxy[a])
            if truth[a] < 0 or iou > overlap[a]:
                truth[a], overlap[a] = j, iou
    for j in range(len(boxes)):  # later boxes overwrite earlier ones on a shared best anchor
        ious = [np_iou(boxes[j], anchors_xyxy[a]) for a in range(num_anchors)]
        best = int(np.argmax(ious))
        truth[best], overlap[best] = j, 2.0
    matched = [
        int(labels[truth[a]]) if truth[a] >= 0 and overlap[a] >= threshold else 0 for a in range(num_anchors)
    ]
    return truth, matched


def reference_loss(loc, logits, anchors, targets, ratio=3, min_negatives=0):
    """Sums over images and anchors with Python loops; returns (loss_box, loss_cls)."""
    loc, logits, anchors = (t.double().numpy() for t in (loc, logits, anchors))
    num_anchors = anchors.shape[0]
    box_sum = cls_sum = 0.0
    total_positive = 0
    for i, target in enumerate(targets):
        boxes, labels = target["boxes"].double().numpy(), target["labels"].numpy()
        truth, matched = reference_match(boxes, labels, anchors)
        positives = [a for a in range(num_anchors) if matched[a] > 0]
        total_positive += len(positives)
        for a in positives:
            box_sum += np_smooth_l1(loc[i, a] - np_encode(boxes[truth[a]], anchors[a]))
            cls_sum += np_cross_entropy(logits[i, a], matched[a])
        negatives = [a for a in range(num_anchors) if matched[a] == 0]
        negatives.sort(key=lambda a: -np_cross_entropy(logits[i, a], 0))
        quota = min(max(ratio * len(positives), min_negatives), num_anchors - 1)
        for a in negatives[:quota]:
            cls_sum += np_cross_entropy(logits[i, a], 0)
    total_positive = max(total_positive, 1)
    return box_sum / total_positive, cls_sum / total_positive


def match_labels(targets, anchors_cxcywh) -> torch.Tensor:
    boxes, labels = [t["boxes"] for t in targets], [t["labels"] for t in targets]
    return AnchorMatcher(0.5)(boxes, labels, box_convert(anchors_cxcywh, "cxcywh", "xyxy"))[1]


# ----- the hand-worked case -----

# four quadrants, the whole image, and a small square (cx, cy, w, h)
HAND_ANCHORS = torch.tensor(
    [
        [0.25, 0.25, 0.5, 0.5],
        [0.75, 0.25, 0.5, 0.5],
        [0.25, 0.75, 0.5, 0.5],
        [0.75, 0.75, 0.5, 0.5],
        [0.50, 0.50, 1.0, 1.0],
        [0.30, 0.30, 0.2, 0.2],
    ]
)


def test_hand_worked_case():
    targets = [
        # IoU with anchor 0 is 0.2 / 0.25 = 0.8; with anchor 3, 0.25 / 0.3025 = 0.83
        {
            "boxes": torch.tensor([[0.0, 0.0, 0.5, 0.4], [0.45, 0.45, 1.0, 1.0]]),
            "labels": torch.tensor([1, 2]),
        },
        # best IoU 0.06 / 0.25 = 0.24 (anchor 1): positive only because it is forced
        {"boxes": torch.tensor([[0.6, 0.0, 0.9, 0.2]]), "labels": torch.tensor([3])},
    ]
    matched = match_labels(targets, HAND_ANCHORS)
    assert matched.tolist() == [[1, 0, 0, 2, 0, 0], [0, 3, 0, 0, 0, 0]]

    # encoded targets by hand: ((cx - acx) / (0.1 aw), (cy - acy) / (0.1 ah), log(w / aw) / 0.2, ...)
    target_0_0 = np.array([0.0, -1.0, 0.0, math.log(0.8) / 0.2])
    target_0_3 = np.array([-0.5, -0.5, math.log(1.1) / 0.2, math.log(1.1) / 0.2])
    target_1_1 = np.array([0.0, -3.0, math.log(0.6) / 0.2, math.log(0.4) / 0.2])

    loc = torch.full((2, 6, 4), 50.0)  # anything at background anchors must not count
    loc[0, 0] = torch.tensor([0.1, -0.5, 0.3, -1.0])
    loc[0, 3] = torch.tensor([1.5, -0.5, 0.0, 0.0])  # |diff| = 2 in x: the linear branch
    loc[1, 1] = torch.tensor([0.0, 0.0, 0.0, 0.0])
    diffs = [
        loc[0, 0].double().numpy() - target_0_0,
        loc[0, 3].double().numpy() - target_0_3,
        loc[1, 1].double().numpy() - target_1_1,
    ]
    expected_box = sum(np_smooth_l1(d) for d in diffs) / 3

    logits = torch.tensor(
        [
            [[0.3, 1.2, -0.4, 0.1], [1.0, 0.0, 0.5, -1.0], [0.2, 0.2, 0.2, 0.9],
             [-0.3, 0.1, 2.0, 0.0], [0.0, -0.5, 0.4, 0.3], [1.5, 0.3, 0.3, -0.2]],
            # background losses of the negatives: 0.34, 1.74, 0.74, 3.28, 1.54 -> anchors 4, 2, 5
            [[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0],
             [1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.5]],
        ]
    )  # fmt: skip
    rows = logits.double().numpy()
    # image 0: 2 positives want 6 negatives, capped at A - 1 = 5, so all 4 negatives count
    image_0 = sum(np_cross_entropy(rows[0, a], label) for a, label in enumerate([1, 0, 0, 2, 0, 0]))
    # image 1: 1 positive, 3 negatives: the three highest background losses
    image_1 = np_cross_entropy(rows[1, 1], 3) + sum(np_cross_entropy(rows[1, a], 0) for a in (4, 2, 5))
    expected_cls = (image_0 + image_1) / 3

    losses = MultiBoxLoss(BoxCoder((0.1, 0.2)))(loc, logits, HAND_ANCHORS, targets)
    assert losses["loss_box"].item() == pytest.approx(expected_box, abs=1e-5)
    assert losses["loss_cls"].item() == pytest.approx(expected_cls, abs=1e-5)


# ----- random cases against the loop reference -----


def random_case(seed: int, num_images=3, num_anchors=60, num_classes=5, max_boxes=5):
    gen = torch.Generator().manual_seed(seed)
    anchors = torch.cat(
        [torch.rand(num_anchors, 2, generator=gen), 0.05 + 0.5 * torch.rand(num_anchors, 2, generator=gen)], 1
    )
    targets = []
    for _ in range(num_images):
        k = int(torch.randint(0, max_boxes + 1, (1,), generator=gen))
        top_left = 0.7 * torch.rand(k, 2, generator=gen)
        size = 0.02 + 0.4 * torch.rand(k, 2, generator=gen)
        targets.append(
            {
                "boxes": torch.cat([top_left, top_left + size], 1),
                "labels": torch.randint(1, num_classes, (k,), generator=gen),
            }
        )
    loc = torch.randn(num_images, num_anchors, 4, generator=gen)
    logits = 2 * torch.randn(num_images, num_anchors, num_classes, generator=gen)
    return loc, logits, anchors, targets


@pytest.mark.parametrize("seed", range(8))
def test_matches_loop_reference_on_random_cases(seed):
    loc, logits, anchors, targets = random_case(seed)
    losses = MultiBoxLoss(BoxCoder())(loc, logits, anchors, targets)
    box, cls = reference_loss(loc, logits, anchors, targets)
    assert losses["loss_box"].item() == pytest.approx(box, rel=1e-5, abs=1e-5)
    assert losses["loss_cls"].item() == pytest.approx(cls, rel=1e-5, abs=1e-5)


def test_matcher_equals_loop_reference_on_many_boxes():
    _, _, anchors, targets = random_case(42, num_images=4, num_anchors=200, max_boxes=12)
    matched = match_labels(targets, anchors)
    for i, target in enumerate(targets):
        _, expected = reference_match(
            target["boxes"].double().numpy(), target["labels"].numpy(), anchors.double().numpy()
        )
        assert matched[i].tolist() == expected


# ----- matching rules -----


def test_forced_best_anchor_matching():
    anchors = torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.5, 0.5, 1.0, 1.0], [0.0, 0.6, 0.3, 1.0]])
    boxes = torch.tensor(
        [
            [0.0, 0.0, 0.3, 0.3],  # IoU 0.56 with anchor 0: positive by threshold...
            [0.0, 0.0, 0.1, 0.1],  # ...but this box's best anchor is 0 too and, being later, wins it
            [0.5, 0.5, 0.6, 0.6],  # IoU 0.04 at best (anchor 1): positive only by forcing
        ]
    )
    matched_boxes, matched = AnchorMatcher(0.5)([boxes], [torch.tensor([1, 2, 3])], anchors)
    assert matched.tolist() == [[2, 3, 0]]
    assert torch.equal(matched_boxes[0, 0], boxes[1]) and torch.equal(matched_boxes[0, 1], boxes[2])
    # without the competing box, anchor 0 goes back to the first box
    _, matched = AnchorMatcher(0.5)([boxes[[0, 2]]], [torch.tensor([1, 3])], anchors)
    assert matched.tolist() == [[1, 3, 0]]


def test_threshold_is_inclusive():
    anchors = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 1.0, 1.0]])
    boxes = torch.tensor([[0.0, 0.0, 0.5, 1.0]])  # IoU 1 with anchor 0, exactly 0.5 with anchor 1
    _, matched = AnchorMatcher(0.5)([boxes], [torch.tensor([4])], anchors)
    assert matched.tolist() == [[4, 4]]
    _, matched = AnchorMatcher(0.6)([boxes], [torch.tensor([4])], anchors)
    assert matched.tolist() == [[4, 0]]


# ----- images without boxes -----


def test_images_without_boxes():
    loc, logits, anchors, targets = random_case(3, num_images=2)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    with_empty = [targets[0], empty, targets[1]]
    loc3 = torch.cat([loc[:1], torch.randn(1, *loc.shape[1:]), loc[1:]])
    logits3 = torch.cat([logits[:1], torch.randn(1, *logits.shape[1:]), logits[1:]])

    # default: the empty image has no positives, mines nothing and adds nothing
    loss_fn = MultiBoxLoss(BoxCoder())
    plain, padded = loss_fn(loc, logits, anchors, targets), loss_fn(loc3, logits3, anchors, with_empty)
    for key in plain:
        assert padded[key].item() == pytest.approx(plain[key].item(), rel=1e-6)

    # min_negatives: every image, the empty one included, mines at least that many negatives
    mined = MultiBoxLoss(BoxCoder(), min_negatives=7)(loc3, logits3, anchors, with_empty)
    box, cls = reference_loss(loc3, logits3, anchors, with_empty, min_negatives=7)
    assert mined["loss_box"].item() == pytest.approx(box, rel=1e-5)
    assert mined["loss_cls"].item() == pytest.approx(cls, rel=1e-5)
    assert mined["loss_cls"].item() > plain["loss_cls"].item()

    # a batch with no boxes at all: zero box loss, finite, and `[]` is accepted as "no boxes"
    nothing = [empty, {"boxes": torch.tensor([]), "labels": torch.tensor([])}]
    losses = MultiBoxLoss(BoxCoder())(loc[:2], logits[:2], anchors, nothing)
    assert losses["loss_box"].item() == 0.0 and losses["loss_cls"].item() == 0.0
    losses = MultiBoxLoss(BoxCoder(), min_negatives=4)(loc[:2], logits[:2], anchors, nothing)
    _, cls = reference_loss(loc[:2], logits[:2], anchors, [empty, empty], min_negatives=4)
    assert losses["loss_cls"].item() == pytest.approx(cls, rel=1e-5) and cls > 0
    # the quota is capped at A - 1 anchors, as in the official code
    losses = MultiBoxLoss(BoxCoder(), min_negatives=10_000)(loc[:1], logits[:1], anchors, [empty])
    _, cls = reference_loss(loc[:1], logits[:1], anchors, [empty], min_negatives=10_000)
    background = torch.logsumexp(logits[0].double(), -1) - logits[0, :, 0].double()
    assert cls == pytest.approx((background.sum() - background.min()).item())
    assert losses["loss_cls"].item() == pytest.approx(cls, rel=1e-5)


# ----- gradients, errors -----


def test_gradients_reach_only_counted_anchors():
    loc, logits, anchors, targets = random_case(5, num_images=2, num_anchors=80)
    loc.requires_grad_(True)
    logits.requires_grad_(True)
    losses = MultiBoxLoss(BoxCoder())(loc, logits, anchors, targets)
    (losses["loss_box"] + losses["loss_cls"]).backward()
    matched = match_labels(targets, anchors)
    positive = matched > 0
    assert positive.any()
    assert (loc.grad.abs().sum(-1) > 0).eq(positive).all()  # random loc: smooth-L1 never exactly 0
    used = logits.grad.abs().sum(-1) > 0
    assert used[positive].all()
    negatives_used = (used & ~positive).sum(1)
    expected = torch.clamp(3 * positive.sum(1), max=anchors.shape[0] - 1)
    assert negatives_used.tolist() == torch.minimum(expected, (~positive).sum(1)).tolist()


def test_bad_targets_raise_clear_errors():
    loc, logits, anchors, targets = random_case(1, num_images=1, max_boxes=3)
    loss_fn = MultiBoxLoss(BoxCoder())
    ok = {"boxes": torch.tensor([[0.1, 0.1, 0.5, 0.5]]), "labels": torch.tensor([1])}
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\].*1\.\.4"):
        loss_fn(loc, logits, anchors, [{**ok, "labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\].*1\.\.4"):
        loss_fn(loc, logits, anchors, [{**ok, "labels": torch.tensor([5])}])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\].*x2 > x1"):
        loss_fn(loc, logits, anchors, [{**ok, "boxes": torch.tensor([[0.5, 0.1, 0.5, 0.5]])}])
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]: expected \[1\]"):
        loss_fn(loc, logits, anchors, [{**ok, "labels": torch.tensor([1, 2])}])
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        loss_fn(loc, logits, anchors, [ok, ok])
    with pytest.raises(ValueError, match=r"targets\[0\]: needs 'boxes'"):
        loss_fn(loc, logits, anchors, [{"labels": torch.tensor([1])}])


# ----- through the model -----


def test_model_train_mode_returns_losses_and_sgd_reduces_them():
    torch.manual_seed(0)
    model = m2det.build_model("m2det_tiny", num_classes=4).train()
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 320, 320), generator=gen, dtype=torch.uint8) for _ in range(2)]
    for image, (x1, y1, x2, y2) in zip(images, [(40, 60, 200, 220), (150, 20, 300, 120)]):
        image[:, y1:y2, x1:x2] = 255  # something to find
    targets = [
        {"boxes": torch.tensor([[40.0, 60.0, 200.0, 220.0]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[150.0, 20.0, 300.0, 120.0], [10.0, 200.0, 60.0, 300.0]]),
            "labels": torch.tensor([2, 3]),
        },
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    totals = []
    for _ in range(3):
        losses = model(images, targets)
        assert set(losses) == {"loss_box", "loss_cls"}
        assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
        total = losses["loss_box"] + losses["loss_cls"]
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert totals[-1] < totals[0]
