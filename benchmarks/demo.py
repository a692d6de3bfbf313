"""The built-in demo, timed: wall time and held-out mAP against its targets (<= 10 min, mAP@0.5 >= 0.90).

Runs exactly what `m2det demo` runs (generate the shapes, train m2det_tiny on the CPU, evaluate,
draw) and prints the figures on one line each. Take the figure on an otherwise idle machine.

    python benchmarks/demo.py [--project runs/bench_demo] [--seed 0] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from m2det.cli.common import next_run_dir, parse_overrides
from m2det.engine.demo import DemoSettings, run_demo
from m2det.progress import show_logs

TIME_LIMIT_S = 600.0
TARGET_AP50 = 0.90


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--project", type=Path, default=Path("runs/bench_demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="a demo setting KEY=VALUE"
    )
    args = parser.parse_args()
    show_logs()  # the trainer's epoch lines, as `m2det train` shows them
    settings = DemoSettings(seed=args.seed).with_overrides(parse_overrides(args.overrides))
    result = run_demo(next_run_dir(args.project), settings, device="cpu", progress=True)
    ap50, ap = result.metrics["AP50"], result.metrics["AP"]
    print(f"run folder      {result.run_dir}")
    print(
        f"wall time       {result.seconds:.0f} s   (target <= {TIME_LIMIT_S:.0f} s: {_ok(result.seconds <= TIME_LIMIT_S)})"
    )
    print(f"held-out mAP@.5 {ap50:.4f}  (target >= {TARGET_AP50}: {_ok(ap50 >= TARGET_AP50)})")
    print(f"held-out mAP    {ap:.4f}  (IoU .50:.95)")


def _ok(passed: bool) -> str:
    return "met" if passed else "MISSED"


if __name__ == "__main__":
    main()
