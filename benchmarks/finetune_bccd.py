"""Does starting from a trained detector pay? Fine-tuning against training from scratch on BCCD.

`m2det_tiny` is first pretrained on one task, the generated shapes (circle, square, triangle, star,
cross: classes BCCD does not have), or taken from `--pretrained`. Then two arms train on BCCD
trainval (blood cells: RBC, WBC, Platelets; real images no one here made) with the same wall-clock
training budget each:

* finetune: `m2det.build_model(weights=PRETRAINED, class_names=BCCD)` (every tensor but the class
  rows of the new classes carried over) with the `finetune` training preset;
* scratch: the same preset and classes from random weights, with the settings of
  `benchmarks/train_bccd.py` (AdamW, cosine), which suit training from scratch.

Both arms get the same number of epochs (sized to the budget from a timing of real steps) and stop
at the budget in any case. They train in alternating chunks, so a change in the machine's load
falls on both alike; after each chunk the model is scored on BCCD test (mAP@0.5, not counted as
training time). The pretraining's own time is reported, and drawn as a shifted curve, since it is
a cost the fine-tuned model carries unless the pretrained model already exists.

    python benchmarks/finetune_bccd.py BUDGET [--pretrain-budget 1200 | --pretrained MODEL.safetensors]
        [--data ../shared/data/bccd] [--evals 8] [--batch-size 8] [--threads N] [--out DIR]
        [--finetune-set KEY=VALUE ...] [--seed 0]

Writes into the run folder (default runs/finetune_bccd/expN): `finetune_vs_scratch.png` (mAP@0.5
against training wall time), `curves.csv` (every evaluation), `summary.json` (settings, final and
best figures, the time the fine-tuned arm took to reach the scratch arm's final mAP@0.5), and the
training run folders `pretrain/`, `scratch/`, `finetune/`.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from m2det.cli.common import next_run_dir, parse_overrides
from m2det.config import get_config
from m2det.data import build_dataset
from m2det.data.synthetic import ShapesConfig, generate_shapes_dataset
from m2det.engine.evaluate import evaluate
from m2det.engine.train import LAST_MODEL, Trainer, cpu_threads, seed_everything
from m2det.engine.train_config import TrainConfig, get_train_config
from m2det.io.jsonfile import write_json
from m2det.models import build_model
from m2det.progress import show_logs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bccd import scratch_recipe, seconds_per_image  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd"
PRESET = "m2det_tiny"


def scratch_config(epochs: int, args: argparse.Namespace) -> TrainConfig:
    """benchmarks/train_bccd.py's settings (AdamW, lr 2e-3, weight decay 0.05, cosine)."""
    return scratch_recipe(epochs, args.batch_size, "adamw", 2e-3, 0.05, args.workers, args.seed)


def plan_epochs(model: torch.nn.Module, dataset: Any, budget: float, batch_size: int) -> tuple[int, float]:
    per_image = seconds_per_image(model, dataset, batch_size)
    # 0.9: room for the per-epoch checkpoint and the loader start-up
    return max(1, int(0.9 * budget / (per_image * len(dataset)))), per_image


def pretrain(run_dir: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """m2det_tiny trained from scratch on generated shapes for `--pretrain-budget` seconds."""
    start = time.perf_counter()
    shapes = ShapesConfig(width=320, height=320, seed=args.seed)
    print(f"pretraining: generating {args.pretrain_images} + 200 shapes images ({', '.join(shapes.classes)})")
    data = generate_shapes_dataset(run_dir / "shapes", args.pretrain_images, 200, shapes)
    probe = TrainConfig(batch_size=args.batch_size)
    train_set = build_dataset(data.train.annotations, transforms=probe.train_transform(320))
    val_set = build_dataset(data.val.annotations, keep_ignored=True)
    seed_everything(args.seed)
    model = build_model(PRESET, num_classes=len(data.class_names) + 1, class_names=list(data.class_names))
    remaining = args.pretrain_budget - (time.perf_counter() - start)
    epochs, _ = plan_epochs(model, train_set, remaining, args.batch_size)
    config = scratch_config(epochs, args)
    print(f"pretraining {PRESET} on {len(train_set)} shapes images: {epochs} epochs")
    result = Trainer(model, config, train_set, None, run_dir=run_dir / "pretrain", device="cpu").fit(
        time_limit_s=args.pretrain_budget - (time.perf_counter() - start)
    )
    seconds = time.perf_counter() - start
    scored = evaluate(model, val_set, progress=False, batch_size=args.batch_size)
    info = {
        "seconds": seconds,
        "epochs": result.epoch,
        "images": len(train_set),
        "classes": list(data.class_names),
        "val_AP50": float(scored.metrics["AP50"]),
    }
    print(f"pretrained in {seconds:.0f} s ({result.epoch} epochs): shapes val mAP@0.5 {info['val_AP50']:.3f}")
    return run_dir / "pretrain" / LAST_MODEL, info


@dataclass
class Arm:
    """One arm's trainer, advanced a chunk of epochs at a time and scored after each chunk."""

    name: str
    model: torch.nn.Module
    trainer: Trainer
    epochs: int
    budget: float
    chunk: int
    epoch: int = 0
    seconds: float = 0.0
    points: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.epoch >= self.epochs or self.seconds >= self.budget

    def score(self, test_set: Any, batch_size: int) -> None:
        result = evaluate(self.model, test_set, progress=False, batch_size=batch_size)
        point = {
            "arm": self.name,
            "epoch": self.epoch,
            "train_seconds": round(self.seconds, 2),
            "AP50": float(result.metrics["AP50"]),
            "AP": float(result.metrics["AP"]),
        }
        self.points.append(point)
        print(f"  {self.name:<8} epoch {self.epoch:>3}  {self.seconds:7.0f} s  mAP@0.5 {point['AP50']:.4f}")

    def advance(self) -> None:
        start = time.perf_counter()
        result = self.trainer.fit(
            resume=self.epoch > 0,
            stop_at_epoch=min(self.epoch + self.chunk, self.epochs),
            time_limit_s=max(self.budget - self.seconds, 1e-3),
        )
        self.seconds += time.perf_counter() - start
        self.epoch = result.epoch


def first_time_reaching(points: list[dict[str, Any]], target: float) -> Optional[float]:
    return next((p["train_seconds"] for p in points if p["AP50"] >= target), None)


def plot(arms: list[Arm], path: Path, pretrain_seconds: Optional[float], budget: float) -> None:
    from matplotlib.figure import Figure

    from m2det.io.atomic import atomic_path

    figure = Figure(figsize=(7.5, 4.8), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    styles = {"finetune": ("o-", "tab:blue"), "scratch": ("s-", "tab:orange")}
    for arm in arms:
        marker, color = styles[arm.name]
        xs = [p["train_seconds"] / 60 for p in arm.points]
        ys = [p["AP50"] for p in arm.points]
        label = "fine-tuned from the shapes model" if arm.name == "finetune" else "from scratch"
        axes.plot(xs, ys, marker, color=color, label=label)
        if arm.name == "finetune" and pretrain_seconds:
            axes.plot(
                [x + pretrain_seconds / 60 for x in xs],
                ys,
                "--",
                color=color,
                alpha=0.5,
                label="fine-tuned, pretraining time included",
            )
    axes.axvline(budget / 60, color="gray", linewidth=0.8, linestyle=":")
    axes.set(
        xlabel="training wall time (minutes, CPU)",
        ylabel="mAP@0.5 on BCCD test",
        title=f"{PRESET} on BCCD: fine-tuning vs from scratch, same budget",
        ylim=(0, 1),
    )
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("budget", type=float, help="training wall budget of each arm, in seconds")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a Pascal VOC folder (BCCD)")
    parser.add_argument(
        "--pretrained", type=Path, help="a pretrained m2det_tiny (.safetensors); skips pretraining"
    )
    parser.add_argument(
        "--pretrain-budget", type=float, default=1200.0, help="seconds of pretraining on shapes"
    )
    parser.add_argument("--pretrain-images", type=int, default=1500, help="generated shapes training images")
    parser.add_argument("--evals", type=int, default=8, help="evaluations per arm (besides the one at 0 s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: one per core left to the workers)"
    )
    parser.add_argument(
        "--finetune-set",
        action="append",
        default=[],
        help="TrainConfig override of the finetune arm, KEY=VALUE",
    )
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/finetune_bccd/expN)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    show_logs()  # the trainer's epoch lines, as `m2det train` shows them
    torch.set_num_threads(args.threads or cpu_threads(args.workers))
    run_dir = args.out or next_run_dir(Path("runs/finetune_bccd"))
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"run folder {run_dir}; {torch.get_num_threads()} torch threads; load average {os.getloadavg()}")

    pretrain_info: dict[str, Any] = {}
    if args.pretrained is None:
        pretrained, pretrain_info = pretrain(run_dir, args)
    else:
        pretrained = args.pretrained

    probe = TrainConfig(batch_size=args.batch_size)
    train_set = build_dataset(
        args.data, "trainval", transforms=probe.train_transform(get_config(PRESET).input_size)
    )
    test_set = build_dataset(args.data, "test", keep_ignored=True)
    names = list(train_set.class_names)

    seed_everything(args.seed)
    scratch_model = build_model(PRESET, num_classes=len(names) + 1, class_names=names)
    epochs, per_image = plan_epochs(scratch_model, train_set, args.budget, args.batch_size)
    seed_everything(args.seed)
    finetune_model = build_model(weights=pretrained, class_names=names)
    if (
        finetune_model.config.name != PRESET
        or finetune_model.config.input_size != get_config(PRESET).input_size
    ):
        print(
            f"note: the pretrained model is {finetune_model.config.name} at {finetune_model.config.input_size}"
        )
    print("\n".join(finetune_model.transfer_report.lines()))
    finetune_config = get_train_config(
        "finetune",
        **{
            "epochs": epochs,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "eval_every": 0,
            "seed": args.seed,
            **parse_overrides(args.finetune_set),
        },
    )
    chunk = max(1, round(epochs / max(1, args.evals)))
    arms = [
        Arm(
            name,
            model,
            Trainer(model, config, train_set, None, run_dir=run_dir / name, device="cpu", progress=False),
            config.epochs,
            args.budget,
            chunk,
        )
        for name, model, config in (
            ("finetune", finetune_model, finetune_config),
            ("scratch", scratch_model, scratch_config(epochs, args)),
        )
    ]
    print(
        f"\n{len(train_set)} BCCD trainval images, ~{per_image * 1000:.0f} ms per image: {epochs} epochs of "
        f"batch {args.batch_size} per arm in a {args.budget:.0f} s budget, scored every {chunk} epoch(s) on "
        f"{len(test_set)} test images"
    )
    for arm in arms:
        arm.score(test_set, args.batch_size)
    while not all(arm.done for arm in arms):
        for arm in arms:
            if not arm.done:
                arm.advance()
                arm.score(test_set, args.batch_size)

    points = [p for arm in arms for p in arm.points]
    with open(run_dir / "curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(points[0]))
        writer.writeheader()
        writer.writerows(points)
    final = {arm.name: arm.points[-1] for arm in arms}
    best = {arm.name: max(arm.points, key=lambda p: p["AP50"]) for arm in arms}
    reach = first_time_reaching(arms[0].points, final["scratch"]["AP50"])
    summary = {
        "budget_s": args.budget,
        "epochs_planned": epochs,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "pretrained": str(pretrained),
        "pretrain": pretrain_info,
        "transfer": finetune_model.transfer_report.to_dict(),
        "finetune_settings": finetune_config.to_dict(),
        "final": final,
        "best": best,
        "finetune_seconds_to_scratch_final_AP50": reach,
    }
    write_json(run_dir / "summary.json", summary, indent=1)
    plot(arms, run_dir / "finetune_vs_scratch.png", pretrain_info.get("seconds"), args.budget)

    print(f"\nmAP@0.5 on BCCD test after {args.budget:.0f} s of training each:")
    for name in ("finetune", "scratch"):
        p, b = final[name], best[name]
        print(
            f"  {name:<8} final {p['AP50']:.4f} ({p['epoch']} epochs, {p['train_seconds']:.0f} s)   "
            f"best {b['AP50']:.4f} at {b['train_seconds']:.0f} s"
        )
    if reach is not None and final["scratch"]["AP50"] > 0:
        print(f"  the fine-tuned arm reached the scratch arm's final mAP@0.5 after {reach:.0f} s")
    if pretrain_info:
        print(
            f"  pretraining took {pretrain_info['seconds']:.0f} s on top (shapes val mAP@0.5 {pretrain_info['val_AP50']:.3f})"
        )
    print(f"run folder {run_dir}: finetune_vs_scratch.png, curves.csv, summary.json")


if __name__ == "__main__":
    main()
