"""The SSD multibox loss: a hand-worked case, a per-anchor loop reference, matching rules, training."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

import m2det
from m2det.boxes.coder import BoxCoder
from m2det.boxes.loss import MultiBoxLoss
from m2det.boxes.matcher import AnchorMatcher, ATSSMatcher

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


HAND_TARGETS = [
    # IoU with anchor 0 is 0.2 / 0.25 = 0.8; with anchor 3, 0.25 / 0.3025 = 0.83
    {
        "boxes": torch.tensor([[0.0, 0.0, 0.5, 0.4], [0.45, 0.45, 1.0, 1.0]]),
        "labels": torch.tensor([1, 2]),
    },
    # best IoU 0.06 / 0.25 = 0.24 (anchor 1): positive only because it is forced
    {"boxes": torch.tensor([[0.6, 0.0, 0.9, 0.2]]), "labels": torch.tensor([3])},
]
HAND_MATCHED = [[1, 0, 0, 2, 0, 0], [0, 3, 0, 0, 0, 0]]
HAND_LOGITS = torch.tensor(
    [
        [[0.3, 1.2, -0.4, 0.1], [1.0, 0.0, 0.5, -1.0], [0.2, 0.2, 0.2, 0.9],
         [-0.3, 0.1, 2.0, 0.0], [0.0, -0.5, 0.4, 0.3], [1.5, 0.3, 0.3, -0.2]],
        # background losses of the negatives: 0.34, 1.74, 0.74, 3.28, 1.54 -> anchors 4, 2, 5
        [[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0],
         [1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.5]],
    ]
)  # fmt: skip
# the anchors whose cross-entropy counts: image 0's 2 positives want 6 negatives, capped at
# A - 1 = 5, so all 4 negatives count; image 1's positive, and its 3 highest background losses
HAND_COUNTED = [(0, a) for a in range(6)] + [(1, 1), (1, 4), (1, 2), (1, 5)]


def test_hand_worked_case():
    targets = HAND_TARGETS
    matched = match_labels(targets, HAND_ANCHORS)
    assert matched.tolist() == HAND_MATCHED

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

    logits = HAND_LOGITS
    rows = logits.double().numpy()
    expected_cls = sum(np_cross_entropy(rows[i, a], HAND_MATCHED[i][a]) for i, a in HAND_COUNTED) / 3

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


# ----- options beside the paper's loss -----


def test_label_smoothing_by_hand_and_against_torch():
    smoothing = 0.1
    loc = torch.zeros(2, 6, 4)
    losses = MultiBoxLoss(BoxCoder(), label_smoothing=smoothing)(loc, HAND_LOGITS, HAND_ANCHORS, HAND_TARGETS)
    rows = HAND_LOGITS.double().numpy()

    def smoothed(row: np.ndarray, label: int) -> float:  # (1 - e) CE(label) + e * mean over classes of CE(c)
        uniform = np.mean([np_cross_entropy(row, c) for c in range(len(row))])
        return (1 - smoothing) * np_cross_entropy(row, label) + smoothing * uniform

    by_hand = sum(smoothed(rows[i, a], HAND_MATCHED[i][a]) for i, a in HAND_COUNTED) / 3
    counted = torch.stack([HAND_LOGITS[i, a] for i, a in HAND_COUNTED]).double()
    labels = torch.tensor([HAND_MATCHED[i][a] for i, a in HAND_COUNTED])
    torch_value = F.cross_entropy(counted, labels, label_smoothing=smoothing, reduction="sum").item() / 3
    assert by_hand == pytest.approx(torch_value, rel=1e-12)
    assert losses["loss_cls"].item() == pytest.approx(by_hand, abs=1e-5)
    # the same anchors count (mining ranks by the plain background loss) and the box loss is untouched
    plain = MultiBoxLoss(BoxCoder())(loc, HAND_LOGITS, HAND_ANCHORS, HAND_TARGETS)
    assert torch.equal(losses["loss_box"], plain["loss_box"])
    assert losses["loss_cls"].item() != pytest.approx(plain["loss_cls"].item())


# the positives of the hand-worked case: (image, anchor) -> (anchor xyxy, matched box)
HAND_PAIRS = [
    ([0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.4]),  # IoU 0.8, enclosing box = the anchor
    ([0.5, 0.5, 1.0, 1.0], [0.45, 0.45, 1.0, 1.0]),  # IoU 0.25 / 0.3025, enclosing = the box
    ([0.5, 0.0, 1.0, 0.5], [0.6, 0.0, 0.9, 0.2]),  # IoU 0.06 / 0.25 = 0.24, enclosing = the anchor
]


def _iou_terms_by_hand() -> dict[str, list[float]]:
    iou = [0.8, 0.25 / 0.3025, 0.24]
    giou = [1 - iou[0], 1 - iou[1], 1 - iou[2]]  # the enclosing box is the union in each pair
    # centre distance^2 over the enclosing box's diagonal^2
    diou = [giou[0] + 0.05**2 / 0.5, giou[1] + 2 * 0.025**2 / (2 * 0.55**2), giou[2] + 0.15**2 / 0.5]
    # aspect term: v = 4 / pi^2 (atan(w_gt / h_gt) - atan(w / h))^2 (every anchor is square),
    # weighted by alpha = v / (1 - IoU + v)
    v = [4 / math.pi**2 * (math.atan(r) - math.pi / 4) ** 2 for r in (0.5 / 0.4, 1.0, 0.3 / 0.2)]
    ciou = [d + vi / (1 - i + vi) * vi for d, vi, i in zip(diou, v, iou)]
    return {"giou": giou, "diou": diou, "ciou": ciou}


@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
def test_iou_box_losses_by_hand(kind):
    loc = torch.full((2, 6, 4), 1e3)  # background anchors decode to inf: they must not reach the loss
    for i, a in ((0, 0), (0, 3), (1, 1)):
        loc[i, a] = 0.0  # a zero offset decodes to the anchor itself
    loc.requires_grad_(True)
    decoded = BoxCoder().decode(torch.zeros(3, 4), HAND_ANCHORS[[0, 3, 1]])
    assert decoded.tolist() == [anchor for anchor, _ in HAND_PAIRS]
    losses = MultiBoxLoss(BoxCoder(), box_loss=kind, box_loss_weight=2.0)(
        loc, HAND_LOGITS, HAND_ANCHORS, HAND_TARGETS
    )
    expected = 2.0 * sum(_iou_terms_by_hand()[kind]) / 3
    assert losses["loss_box"].item() == pytest.approx(expected, abs=1e-5)
    (losses["loss_box"] + losses["loss_cls"]).backward()
    assert torch.isfinite(loc.grad).all() and loc.grad[0, 0].abs().sum() > 0
    assert loc.grad[0, 1].abs().sum() == 0  # background


def test_loss_options_are_checked():
    with pytest.raises(ValueError, match="box_loss must be one of"):
        MultiBoxLoss(BoxCoder(), box_loss="iou")
    with pytest.raises(ValueError, match="label_smoothing"):
        MultiBoxLoss(BoxCoder(), label_smoothing=1.0)
    with pytest.raises(ValueError, match="needs the number of anchors of each pyramid level"):
        MultiBoxLoss(BoxCoder(), matcher=ATSSMatcher(3))(*random_case(0)[:3], random_case(0)[3])


# ----- ATSS -----


def grid_anchors(*levels: tuple[int, float]) -> torch.Tensor:
    """One square anchor per cell of an n x n grid per level (cx, cy, w, h), row-major as M2Det's."""
    out = []
    for n, side in levels:
        for row in range(n):
            for col in range(n):
                out.append([(col + 0.5) * side, (row + 0.5) * side, side, side])
    return torch.tensor(out, dtype=torch.float64).float()


def test_atss_hand_worked_case():
    # level 0: 4 x 4 cells of 0.25 (anchors 0-15), level 1: 2 x 2 of 0.5 (anchors 16-19); top 3 per level
    anchors = grid_anchors((4, 0.25), (2, 0.5))
    box_1 = [0.0, 0.0, 0.3, 0.4]  # centre (0.15, 0.2), area 0.12
    # nearest centres: level 0 anchors 0, 4, 1; level 1 anchors 16, 18, 17. IoUs by hand:
    # a0 [0,0,.25,.25] 0.0625 / 0.12; a4 [0,.25,.25,.5] 0.0375 / 0.145; a1 [.25,0,.5,.25] 0.0125 / 0.17;
    # a16 [0,0,.5,.5] 0.12 / 0.25; a18, a17 0
    ious_1 = [0.0625 / 0.12, 0.0375 / 0.145, 0.0125 / 0.17, 0.48, 0.0, 0.0]
    threshold_1 = statistics.mean(ious_1) + statistics.stdev(ious_1)  # 0.458
    assert [i >= threshold_1 for i in ious_1] == [True, False, False, True, False, False]
    box_2 = [0.0, 0.25, 0.45, 0.6]  # centre (0.225, 0.425), area 0.1575
    # nearest: a4, a5, a8; a16, a18, a17. a4 [0,.25,.25,.5] 0.0625 / 0.1575; a5 [.25,.25,.5,.5]
    # 0.05 / 0.17; a8 [0,.5,.25,.75] 0.025 / 0.195; a16 0.1125 / 0.295; a18 0.045 / 0.3625; a17 0
    ious_2 = [0.0625 / 0.1575, 0.05 / 0.17, 0.025 / 0.195, 0.1125 / 0.295, 0.045 / 0.3625, 0.0]
    threshold_2 = statistics.mean(ious_2) + statistics.stdev(ious_2)  # 0.381
    # a4 and a16 pass, but a16's centre (0.25, 0.25) lies on the box's edge, not inside
    assert [i >= threshold_2 for i in ious_2] == [True, False, False, True, False, False]
    box_3 = [0.26, 0.26, 0.3, 0.3]  # no candidate centre inside: it gets its best-IoU anchor, a5
    boxes = [torch.tensor([box_1, box_2]), torch.tensor([box_2, box_3])]
    labels = [torch.tensor([1, 2]), torch.tensor([2, 3])]
    xyxy = box_convert(anchors, "cxcywh", "xyxy")
    matched_boxes, matched = ATSSMatcher(3)(boxes, labels, xyxy, [16, 4])
    expected = torch.zeros(2, 20, dtype=torch.int64)
    expected[0, [0, 16]], expected[0, 4] = 1, 2
    expected[1, 4], expected[1, 5] = 2, 3
    assert torch.equal(matched, expected)
    assert matched_boxes[0, 16].tolist() == pytest.approx(box_1) and matched_boxes[
        1, 5
    ].tolist() == pytest.approx(box_3)
    # the 0.5-IoU rule differs: a16 (IoU 0.48) stays background, and box 2 only gets its forced best anchor
    _, by_iou = AnchorMatcher(0.5)(boxes, labels, xyxy)
    assert by_iou[0].nonzero().flatten().tolist() == [0, 4]


def reference_atss(boxes: np.ndarray, anchors_xyxy: np.ndarray, levels: list[int], topk: int) -> list[int]:
    """The truth index of every anchor (-1: background), one box and one anchor at a time."""
    centres = (anchors_xyxy[:, :2] + anchors_xyxy[:, 2:]) / 2
    ious = np.array([[np_iou(b, a) for a in anchors_xyxy] for b in boxes]).reshape(
        len(boxes), len(anchors_xyxy)
    )
    positive = np.zeros_like(ious, dtype=bool)
    for j, box in enumerate(boxes):
        centre = (box[:2] + box[2:]) / 2
        candidates, start = [], 0
        for size in levels:
            order = sorted(
                range(start, start + size), key=lambda a: float(((centres[a] - centre) ** 2).sum())
            )
            candidates += order[:topk]
            start += size
        values = [ious[j, a] for a in candidates]
        threshold = statistics.mean(values) + statistics.stdev(values)
        for a in candidates:
            inside = box[0] < centres[a, 0] < box[2] and box[1] < centres[a, 1] < box[3]
            positive[j, a] = ious[j, a] >= threshold and inside
        if not positive[j].any():
            positive[j, int(np.argmax(ious[j]))] = True
    return [int(np.argmax(np.where(positive[:, a], ious[:, a], -1))) if positive[:, a].any() else -1
            for a in range(len(anchors_xyxy))]  # fmt: skip


@pytest.mark.parametrize("seed", range(4))
def test_atss_matches_the_loop_reference_on_random_cases(seed):
    gen = torch.Generator().manual_seed(seed)
    levels = [60, 30, 10]
    centres = torch.rand(100, 2, generator=gen, dtype=torch.float64)
    sides = torch.cat([torch.full((n, 2), s, dtype=torch.float64) for n, s in zip(levels, (0.1, 0.25, 0.5))])
    anchors = box_convert(
        torch.cat([centres, sides * (0.8 + 0.4 * torch.rand(100, 2, generator=gen))], 1), "cxcywh", "xyxy"
    )
    _, _, _, targets = random_case(seed, num_images=3, max_boxes=6)
    boxes = [t["boxes"].double() for t in targets]
    matched_boxes, matched = ATSSMatcher(4)(boxes, [t["labels"] for t in targets], anchors, levels)
    for i, target in enumerate(targets):
        truth = reference_atss(boxes[i].numpy(), anchors.numpy(), levels, 4)
        labels = target["labels"].tolist()
        assert matched[i].tolist() == [labels[j] if j >= 0 else 0 for j in truth], i
        for a, j in enumerate(truth):
            if j >= 0:
                assert torch.equal(matched_boxes[i, a], boxes[i][j])


def test_model_trains_with_the_modern_loss():
    from m2det.engine.train_config import get_train_config
    from train_helpers import SIZE, tiny_model

    model = tiny_model().train()
    model.loss_fn = get_train_config("modern").build_loss(model)
    assert isinstance(model.loss_fn.matcher, ATSSMatcher) and model.loss_fn.matcher.topk == 9 * 6
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, SIZE, SIZE), generator=gen, dtype=torch.uint8) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[30.0, 20.0, 60.0, 50.0], [5.0, 5.0, 20.0, 15.0]]),
            "labels": torch.tensor([2, 1]),
        },
    ]
    losses = model(images, targets)  # the model hands the loss its anchors per pyramid level
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    levels = model.anchor_level_sizes(SIZE)
    assert len(levels) == model.config.mlfpn.num_scales and sum(levels) == len(model.anchors(SIZE))
