"""Learning on real data: m2det_tiny trained on BCCD trainval for a fixed wall budget, scored on test.

The schedule (warm-up, then cosine) is sized to the budget from a short timing of real training
steps, and training stops at the budget in any case. Prints AP@0.5 per class and overall, COCO AP,
and training / evaluation images per second. From scratch (no ImageNet weights exist for the tiny
backbone), so the figures show that training learns, not what M2Det reaches on this data.

    python benchmarks/train_bccd.py SECONDS [--data ../shared/data/bccd] [--batch-size 8] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from m2det.config import get_config
from m2det.data import build_dataset, build_loader
from m2det.engine.evaluate import evaluate
from m2det.engine.train import Trainer, cpu_threads, seed_everything
from m2det.engine.train_config import TrainConfig
from m2det.models import build_model
from m2det.progress import show_logs

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd"


def seconds_per_image(model: torch.nn.Module, dataset, batch_size: int, steps: int = 3) -> float:
    """Wall time of loading + augmenting + forward + backward, per image, on a throwaway copy of the model."""
    import copy

    probe = copy.deepcopy(model).train()
    loader = build_loader(dataset, batch_size, shuffle=True)
    batches = iter(loader)
    elapsed = 0.0
    for step in range(steps + 1):
        start = time.perf_counter()
        images, targets = next(batches)
        targets = [{"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"]} for t in targets]
        losses = probe(list(images), targets)
        (losses["loss_box"] + losses["loss_cls"]).backward()
        if step:  # the first step pays one-off costs
            elapsed += time.perf_counter() - start
    return elapsed / (steps * batch_size)


def scratch_recipe(
    epochs: int, batch_size: int, optimizer: str, lr: float, weight_decay: float, workers: int, seed: int
) -> TrainConfig:
    """The settings that converge from random weights on a CPU budget: warm-up for a quarter of the
    epochs (at most one) from lr/10, then cosine, gradients clipped."""
    return TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        warmup_epochs=min(1.0, epochs / 4),
        warmup_start_lr=lr / 10,
        policy="cosine",
        milestones=[],
        clip_grad=10.0,
        workers=workers,
        eval_every=0,
        seed=seed,
    ).validate()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("budget", type=float, help="training wall budget in seconds")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a Pascal VOC folder (BCCD)")
    parser.add_argument("--model", default="m2det_tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    # From scratch, AdamW converges several times faster than SGD (measured on the demo's shapes).
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: one per core left to the workers)"
    )
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    show_logs()  # the trainer's epoch lines, as `m2det train` shows them
    torch.set_num_threads(args.threads or cpu_threads(args.workers))
    start = time.perf_counter()

    probe_config = TrainConfig(batch_size=args.batch_size)
    model_config = get_config(args.model)
    train_set = build_dataset(
        args.data, "trainval", transforms=probe_config.train_transform(model_config.input_size)
    )
    test_set = build_dataset(args.data, "test", keep_ignored=True)
    model_config = get_config(
        args.model, num_classes=train_set.num_classes, class_names=list(train_set.class_names)
    )
    seed_everything(args.seed)
    model = build_model(model_config)
    per_image = seconds_per_image(model, train_set, args.batch_size)
    remaining = args.budget - (time.perf_counter() - start)
    # 0.9: room for the per-epoch checkpoint and the loader start-up
    epochs = max(1, int(0.9 * remaining / (per_image * len(train_set))))
    config = scratch_recipe(
        epochs, args.batch_size, args.optimizer, args.lr, args.weight_decay, args.workers, args.seed
    )
    print(
        f"{model_config.name} on {len(train_set)} trainval images: ~{per_image * 1000:.0f} ms per image, "
        f"{epochs} epochs of batch {args.batch_size} in a {args.budget:.0f} s budget"
    )
    run_dir = args.out or Path(tempfile.mkdtemp(prefix="m2det_bccd_"))
    trained = Trainer(model, config, train_set, None, run_dir=run_dir, device="cpu").fit(
        time_limit_s=args.budget - (time.perf_counter() - start)
    )
    train_seconds = time.perf_counter() - start
    result = evaluate(model, test_set, progress=False, batch_size=args.batch_size)

    print(
        f"\ntrained {trained.epoch} epochs in {train_seconds:.0f} s (budget {args.budget:.0f} s); run folder {run_dir}"
    )
    print(f"training   {trained.images_per_second:.1f} images/s")
    print(f"evaluation {result.num_images / result.seconds:.1f} images/s ({result.num_images} test images)")
    print("AP@0.5 per class on test:")
    for row in result.per_class:
        print(f"  {row.name:<10} {row.ap50:.4f}  ({row.num_gt} boxes)")
    print(f"mAP@0.5 {result.metrics['AP50']:.4f}   COCO mAP@[.5:.95] {result.metrics['AP']:.4f}")


if __name__ == "__main__":
    main()
