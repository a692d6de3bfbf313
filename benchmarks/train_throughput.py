"""Training throughput: images/s of a full training step (forward, multibox loss, backward, SGD).

Random images with a few random boxes, so the figure is the network's and the loss's cost alone
(data loading is measured by the real runs: benchmarks/demo.py, benchmarks/train_bccd.py).

    python benchmarks/train_throughput.py [--model m2det320_vgg16] [--batch-size 4] [--steps 5] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch

from m2det.device import resolve_device
from m2det.engine.train_config import TrainConfig
from m2det.models import build_model
from m2det.utils.timing import Stopwatch


def random_batch(batch_size: int, size: int, num_classes: int, gen: torch.Generator) -> tuple[list, list]:
    images = [
        torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen) for _ in range(batch_size)
    ]
    targets = []
    for _ in range(batch_size):
        corner = torch.rand(4, 2, generator=gen) * size * 0.6
        sides = torch.rand(4, 2, generator=gen) * size * 0.35 + size * 0.05
        boxes = torch.cat([corner, corner + sides], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, num_classes, (4,), generator=gen)})
    return images, targets


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="m2det320_vgg16")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one untimed warm-up step)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=args.num_classes).to(device).train()
    config = TrainConfig()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    images, targets = random_batch(
        args.batch_size, model.config.input_size, args.num_classes, torch.Generator().manual_seed(0)
    )
    images = [image.to(device) for image in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]

    def step() -> None:
        with torch.autocast(device.type, enabled=use_amp):
            losses = model(images, targets)
        loss = losses["loss_box"] + losses["loss_cls"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    # one untimed warm-up step: the first pays one-off allocation and kernel selection
    timing = Stopwatch(device).repeat(step, warmup=1, repeats=args.steps)
    median = timing.median_ms / 1e3
    print(
        f"{args.model} training, batch {args.batch_size}, input {model.config.input_size}, {device}, "
        f"{torch.get_num_threads()} threads{', AMP' if use_amp else ''}"
    )
    print(
        f"  {median:.2f} s/step median over {timing.runs} steps (min {timing.min_ms / 1e3:.2f}, max {timing.max_ms / 1e3:.2f})"
    )
    print(f"  {args.batch_size / median:.2f} images/s")


if __name__ == "__main__":
    main()
