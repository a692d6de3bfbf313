"""Post-processing time per image: 81 classes, a 512 input (32,760 anchors), CPU.

Synthesises predictions in which exactly N (anchor, class) scores pass the score threshold, with
the boxes clustered around a few dozen objects as a trained detector's are, then times
`PostProcessor` (decode, softmax, filter, NMS, caps) with hard NMS and with soft-NMS.

    python benchmarks/postprocess.py [--boxes 1000 10000] [--repeat 5] [--threads N]
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torchvision.ops import box_convert, box_iou

import m2det
from m2det.boxes.coder import BoxCoder
from m2det.boxes.postprocess import PAPER, PostProcessor
from m2det.utils.timing import Stopwatch

NUM_CLASSES = 81
INPUT_SIZE = 512
IMAGE_SIZE = (480, 640)
MAX_CLASSES_PER_ANCHOR = 15


def synthesize(
    anchors: torch.Tensor, num_above: int, threshold: float, num_objects: int = 40, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(loc [1, A, 4], logits [1, A, C])` with exactly `num_above` foreground scores above `threshold`."""
    g = torch.Generator().manual_seed(seed)
    num_anchors = anchors.shape[0]
    corners = box_convert(anchors, "cxcywh", "xyxy")
    centres = torch.rand(num_objects, 2, generator=g) * 0.8 + 0.1
    sides = torch.rand(num_objects, 2, generator=g) * 0.35 + 0.05
    objects = torch.cat([centres - sides / 2, centres + sides / 2], dim=1).clamp(0, 1)
    classes = torch.randint(1, NUM_CLASSES, (num_objects,), generator=g)
    iou = box_iou(objects, corners)  # [objects, A]

    # Objects take turns claiming their next best-overlapping anchor for their class until exactly
    # num_above pairs exist; an anchor holds at most MAX_CLASSES_PER_ANCHOR classes so that every
    # chosen probability can stay above the threshold.
    ranked = iou.topk(min(num_anchors, 4 * num_above // num_objects + 100), dim=1).indices.tolist()
    chosen: dict[tuple[int, int], None] = {}
    per_anchor: Counter[int] = Counter()
    order = torch.randperm(num_objects, generator=g).tolist()
    depth = 0
    while len(chosen) < num_above:
        for obj in order:
            pair = (ranked[obj][depth], int(classes[obj]))
            if pair not in chosen and per_anchor[pair[0]] < MAX_CLASSES_PER_ANCHOR:
                chosen[pair] = None
                per_anchor[pair[0]] += 1
                if len(chosen) == num_above:
                    break
        depth += 1
    anchor_idx, class_idx = torch.tensor(list(chosen)).unbind(1)

    # Probabilities: chosen pairs above the threshold, the rest far below, background the remainder.
    probs = torch.full((num_anchors, NUM_CLASSES), 1e-4)
    shares = torch.tensor([per_anchor[a] for a in anchor_idx.tolist()], dtype=torch.float32)
    low = threshold + 0.005
    high = torch.clamp(0.95 / shares, max=0.9)
    probs[anchor_idx, class_idx] = low + torch.rand(len(shares), generator=g) * (high - low)
    probs[:, 0] = 1 - probs[:, 1:].sum(dim=1)
    logits = probs.log()
    if int((logits.softmax(-1)[:, 1:] > threshold).sum()) != num_above:
        raise RuntimeError("synthesis missed the requested number of boxes above the threshold")

    # Boxes regress towards the anchor's best object, with jitter, so each cluster overlaps.
    target = objects[iou.argmax(dim=0)]
    jitter = (torch.rand(num_anchors, 4, generator=g) - 0.5) * 0.04
    loc = BoxCoder().encode((target + jitter).clamp(0, 1), anchors)
    return loc[None], logits[None]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--boxes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    anchors = m2det.anchors("m2det512_vgg16")
    print(
        f"{NUM_CLASSES} classes, input {INPUT_SIZE}, {anchors.shape[0]:,} anchors, image {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]}, "
        f"CPU, {torch.get_num_threads()} threads, median of {args.repeat}"
    )
    print(f"{'boxes > thr':>12} {'nms':>9} {'ms/image':>9} {'decode+filter':>14} {'nms+caps':>9} {'kept':>6}")
    for num_above in args.boxes:
        loc, logits = synthesize(anchors, num_above, PAPER.score_threshold)
        for nms in ("hard", "linear", "gaussian"):
            post = PostProcessor(BoxCoder(), PAPER.replace(nms=nms))
            total, filtering, kept = measure(post, loc, logits, anchors, num_above, args.repeat)
            print(
                f"{num_above:>12,} {nms:>9} {total * 1e3:>9.1f} {filtering * 1e3:>14.1f} "
                f"{(total - filtering) * 1e3:>9.1f} {kept:>6}"
            )


@torch.inference_mode()
def measure(
    post: PostProcessor,
    loc: torch.Tensor,
    logits: torch.Tensor,
    anchors: torch.Tensor,
    expected: int,
    repeat: int,
) -> tuple[float, float, int]:
    """Median seconds of the whole post-processing and of its decode + score filter; boxes kept."""
    sizes = [IMAGE_SIZE]
    found = post.candidates(*post.decode(loc, logits, anchors, sizes))
    if found.scores.numel() != expected:
        raise RuntimeError(f"{found.scores.numel()} candidates, expected {expected}")
    stopwatch = Stopwatch(torch.device("cpu"))
    total = stopwatch.repeat(lambda: post(loc, logits, anchors, sizes), 1, repeat).median_ms / 1e3
    filtering = (
        stopwatch.repeat(
            lambda: post.candidates(*post.decode(loc, logits, anchors, sizes)), 1, repeat
        ).median_ms
        / 1e3
    )
    return total, filtering, len(post(loc, logits, anchors, sizes)[0]["scores"])


if __name__ == "__main__":
    main()
