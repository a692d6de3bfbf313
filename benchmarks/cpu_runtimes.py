"""Our CPU runtimes against the authors' M2Det code with the same weights: network time per row in
ABBA-ordered rounds, and (`--profile`) where the time goes, op by op.

The authors' network (VDIGPKU/M2Det's m2det.py, outside this repository: `--authors-code DIR`, whose
README says how it is laid out) is built with random weights (BatchNorm statistics randomised as
training would leave them), and its state dict is loaded into ours with
`m2det.models.loading.build_official_model`; every row's outputs are checked against the authors'
before timing. It is built in its "train" phase and run in eval mode: the same network as "test"
without the final softmax, so both sides return raw (loc, logits). Without the authors' code the
benchmark runs our rows alone, on random weights.

Rounds run the rows in ABBA order (A B C, C B A, A B C, ...), so a drift in the machine's load
hits every row alike; each row gets the median and p25-p75 of its times, and its speed against
"authors no_grad" is the median (p25-p75) of the per-round ratios. On a shared machine pin the
process for steadier A/Bs, e.g. `taskset -c 0 python benchmarks/cpu_runtimes.py --threads 1`.

    python benchmarks/cpu_runtimes.py [--presets m2det320_vgg16,m2det512_vgg16] [--batches 1,4]
        [--threads 2] [--rounds 10] [--warmup 2] [--rows NAME,...] [--authors-code DIR]
        [--calib-data DIR] [--profile] [--out runs/cpu_runtimes.json]

Rows come from `ROW_BUILDERS`: (name, builder), where builder(Setup) returns the callable to time
(the batch in, raw outputs out) or a string saying why the row cannot run here. Another runtime
(e.g. OpenVINO) is one more entry.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from m2det.config import get_config
from m2det.deploy import optimize_for_inference
from m2det.device import cpu_supports_bf16
from m2det.io.jsonfile import write_json
from m2det.models import build_model
from m2det.models.loading import build_official_model
from m2det.models.m2det import M2Det
from m2det.utils.machine import cpu_model, present_speed_flags
from m2det.utils.timing import Timing

DEFAULT_AUTHORS_CODE = Path("/work/authors_m2det")
BASELINE = "authors no_grad"

Outputs = Any  # (loc, logits) or whatever a runtime returns first


@dataclass
class Setup:
    """One preset and batch: the models every row starts from, the input batch, and shared scratch."""

    preset: str
    batch: int
    threads: int
    ours: M2Det  # eager, eval, the same weights as `authors`
    authors: Optional[nn.Module]
    x: Tensor
    calib_data: Optional[str] = None
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="m2det-cpu-runtimes-")))
    cache: dict[str, Any] = field(default_factory=dict)  # what several rows share (an ONNX export)


Builder = Callable[[Setup], Union[Callable[[], Outputs], str]]


def _authors(grad: bool) -> Builder:
    def build(setup: Setup) -> Union[Callable[[], Outputs], str]:
        net = setup.authors
        if net is None:
            return "no authors' code (--authors-code)"
        if grad:
            return lambda: net(setup.x)
        return lambda: _no_grad(net, setup.x)

    return build


def _no_grad(net: nn.Module, x: Tensor) -> Outputs:
    with torch.no_grad():
        return net(x)


def _ours_eager(setup: Setup) -> Callable[[], Outputs]:
    return lambda: _no_grad_raw(setup.ours, setup.x)


def _no_grad_raw(model: M2Det, x: Tensor) -> Outputs:
    with torch.no_grad():
        return model.forward_raw(x)


def _ours_fast(**options: Any) -> Builder:
    def build(setup: Setup) -> Union[Callable[[], Outputs], str]:
        if options.get("precision") == "bf16" and not cpu_supports_bf16():
            return "the CPU lacks AVX512-BF16/AMX"
        fast = optimize_for_inference(setup.ours, **options)
        return lambda: fast.forward_raw(setup.x)

    return build


def _ours_bf16_autocast(setup: Setup) -> Union[Callable[[], Outputs], str]:
    """The fp32 fast path under bf16 autocast (weights cast on every call): what bf16 was before."""
    if not cpu_supports_bf16():
        return "the CPU lacks AVX512-BF16/AMX"
    fast = optimize_for_inference(setup.ours, prepack=False)

    def run() -> Outputs:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loc, logits = fast.forward_raw(setup.x)
        return loc.float(), logits.float()

    return run


def _runtime(key: str) -> Builder:
    """A row run by `m2det bench --backends`' own preparation of runtime `key` (export, INT8
    calibration), sharing one export between the rows of a setup."""

    def build(setup: Setup) -> Union[Callable[[], Outputs], str]:
        from m2det.engine.bench_runtimes import (
            RUNTIMES,
            RuntimeBenchSettings,
            RuntimeContext,
            prepare_runtime,
            unavailable,
        )

        spec = next(spec for spec in RUNTIMES if spec.key == key)
        why = unavailable(spec, int8=True)
        if why is not None:
            return why
        if spec.precision == "int8" and setup.calib_data is None:
            return "INT8 needs --calib-data"
        if "context" not in setup.cache:
            settings = RuntimeBenchSettings(
                model=setup.preset, calib_data=setup.calib_data, calib_split="train", calib_num=32
            )
            size = setup.ours.input_size
            setup.cache["context"] = RuntimeContext(setup.ours, size, setup.tmp, settings, setup.threads)
        prepared = prepare_runtime(spec, setup.cache["context"])
        return lambda: prepared.call(setup.x)

    return build


ROW_BUILDERS: list[tuple[str, Builder]] = [
    ("authors autograd", _authors(grad=True)),
    (BASELINE, _authors(grad=False)),
    ("ours eager no_grad", _ours_eager),
    ("ours fast without prepack", _ours_fast(prepack=False)),  # the fast path before prepacking
    ("ours fast (default)", _ours_fast()),
    ("ours bf16 autocast", _ours_bf16_autocast),
    ("ours bf16", _ours_fast(precision="bf16")),
    ("ours winograd", _ours_fast(precision="winograd")),
    ("onnxruntime fp32", _runtime("onnxruntime-fp32")),
    ("onnxruntime int8", _runtime("onnxruntime-int8")),
    ("openvino fp32", _runtime("openvino-fp32")),
    ("openvino int8", _runtime("openvino-int8")),
]


# ----- the two networks with one set of weights -----
def authors_config(preset: str) -> tuple[int, dict[str, Any]]:
    """The authors' build_net arguments for one of our VGG presets: (size, config)."""
    config = get_config(preset)
    if config.backbone.name != "vgg16":
        raise SystemExit(f"{preset}: the authors' code is wired here for the VGG16 presets only")
    m = config.mlfpn
    return config.input_size, {
        "backbone": "vgg16",
        "net_family": "vgg",
        "base_out": [22, 34],
        "planes": m.planes,
        "num_levels": m.num_levels,
        "num_scales": m.num_scales,
        "sfam": m.sfam,
        "smooth": m.smooth,
        "num_classes": config.num_classes,
    }


def build_authors(code: Path, preset: str, seed: int = 0) -> nn.Module:
    """The authors' network for `preset` with random weights and trained-looking BatchNorm statistics."""
    sys.path.insert(0, str(code))
    from m2det_authors import build_net  # type: ignore[import-not-found]  # outside the repo

    size, config = authors_config(preset)
    torch.manual_seed(seed)
    net = build_net("train", size, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                module.weight.copy_(torch.rand(n, generator=g) + 0.5)
                module.bias.copy_((torch.rand(n, generator=g) - 0.5) * 0.2)
    return net.eval()


def relative_difference(actual: Outputs, expected: Outputs) -> float:
    """The largest |difference| of the raw outputs, relative to each output's largest magnitude."""
    return max(
        float((a.float().reshape(e.shape) - e).abs().max() / e.abs().max().clamp(min=1))
        for a, e in zip(actual[:2], expected[:2])
    )


# ----- timing -----
def abba_rounds(fns: dict[str, Callable[[], Outputs]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each callable over `rounds` rounds, every other round in reverse order."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            fns[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def summarise(seconds: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Per row: its Timing, and its per-round speed against the baseline (median, p25, p75)."""
    rows: dict[str, dict[str, Any]] = {}
    base = seconds.get(BASELINE)
    for name, values in seconds.items():
        row: dict[str, Any] = {"timing": Timing.of(values).__dict__}
        if base is not None:
            ratios = torch.tensor([b / v for b, v in zip(base, values)], dtype=torch.float64)
            p25, median, p75 = ratios.quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
            row["speed_vs_baseline"] = {"median": median, "p25": p25, "p75": p75}
        rows[name] = row
    return rows


def print_table(title: str, rows: dict[str, dict[str, Any]], skipped: dict[str, str]) -> None:
    print(f"\n{title}")
    print(
        f"{'runtime':26s} {'median ms':>10s} {'p25-p75 ms':>17s} {'min-max ms':>17s} {'vs ' + BASELINE:>24s}"
    )
    for name, row in rows.items():
        t = row["timing"]
        speed = row.get("speed_vs_baseline")
        ratio = f"{speed['median']:.2f}x ({speed['p25']:.2f}-{speed['p75']:.2f})" if speed else "-"
        print(
            f"{name:26s} {t['median_ms']:10.1f} {t['p25_ms']:8.1f}-{t['p75_ms']:<8.1f} "
            f"{t['min_ms']:8.1f}-{t['max_ms']:<8.1f} {ratio:>24s}"
        )
    for name, why in skipped.items():
        print(f"{name:26s} not run: {why}")


# ----- profile -----
def profile_ops(fn: Callable[[], Outputs], iterations: int) -> dict[str, dict[str, float]]:
    """Self CPU time (ms per forward) and calls per forward of each op over `iterations` forwards."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            fn()
    return {
        event.key: {
            "self_ms": event.self_cpu_time_total / 1e3 / iterations,
            "calls": event.count / iterations,
        }
        for event in prof.key_averages()
        if event.self_cpu_time_total > 0
    }


def print_profile(profiles: dict[str, dict[str, dict[str, float]]], top: int = 25) -> None:
    names = list(profiles)
    ops = sorted(
        {op for table in profiles.values() for op in table},
        key=lambda op: -max(table.get(op, {}).get("self_ms", 0.0) for table in profiles.values()),
    )
    print("\nself CPU ms per forward (calls per forward), by op")
    print(f"{'op':44s}" + "".join(f"{name:>26s}" for name in names))
    for op in ops[:top]:
        cells = []
        for name in names:
            entry = profiles[name].get(op)
            cells.append(f"{entry['self_ms']:12.1f} ({entry['calls']:5.0f})" if entry else f"{'-':>20s}")
        print(f"{op[:44]:44s}" + "".join(f"{cell:>26s}" for cell in cells))
    totals = [sum(e["self_ms"] for e in profiles[name].values()) for name in names]
    print(f"{'total':44s}" + "".join(f"{total:20.1f}      " for total in totals))


# ----- main -----
def build_rows(
    setup: Setup, wanted: Optional[set[str]]
) -> tuple[dict[str, Callable[[], Outputs]], dict[str, str]]:
    """The callables of the rows that can run here, and why each other one cannot."""
    fns: dict[str, Callable[[], Outputs]] = {}
    skipped: dict[str, str] = {}
    for name, builder in ROW_BUILDERS:
        if wanted is not None and name not in wanted:
            continue
        result = builder(setup)
        if isinstance(result, str):
            skipped[name] = result
        else:
            fns[name] = result
    return fns, skipped


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="m2det320_vgg16,m2det512_vgg16")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10, help="ABBA rounds (each row once per round)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    parser.add_argument(
        "--authors-code",
        type=Path,
        default=DEFAULT_AUTHORS_CODE if DEFAULT_AUTHORS_CODE.is_dir() else None,
        help="folder holding m2det_authors.py (default: /work/authors_m2det if it exists)",
    )
    parser.add_argument("--calib-data", default=None, help="data for the ONNX Runtime INT8 row's calibration")
    parser.add_argument("--profile", action="store_true", help="op-by-op profile instead of the timing table")
    parser.add_argument("--profile-iterations", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/cpu_runtimes.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wanted = set(args.rows.split(",")) if args.rows else None
    machine = {
        "cpu": cpu_model(),
        "flags": present_speed_flags(),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    print(
        f"{machine['cpu']}; flags: {' '.join(machine['flags'])}; {args.threads} threads; torch {torch.__version__}"
    )
    results: list[dict[str, Any]] = []
    for preset in args.presets.split(","):
        vgg = get_config(preset).backbone.name == "vgg16"  # what the authors' code is wired for here
        authors = build_authors(args.authors_code, preset) if args.authors_code and vgg else None
        if authors is not None:
            ours = build_official_model(authors.state_dict(), preset).eval()
        else:
            ours = build_model(preset, **{"backbone.weights": None}).eval()
        for batch in (int(b) for b in args.batches.split(",")):
            size = ours.input_size
            x = ours.normalize(
                torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
            )
            setup = Setup(preset, batch, args.threads, ours, authors, x, args.calib_data)
            fns, skipped = build_rows(setup, wanted)
            expected = fns[BASELINE]() if BASELINE in fns else _no_grad_raw(ours, x)
            differences = {name: relative_difference(fn(), expected) for name, fn in fns.items()}
            for name, difference in differences.items():
                print(f"{preset} batch {batch}: {name:26s} largest relative difference {difference:.1e}")
            entry: dict[str, Any] = {
                "preset": preset,
                "batch": batch,
                "skipped": skipped,
                "max_relative_difference": differences,
            }
            if args.profile:
                entry["profile"] = {
                    name: profile_ops(fn, args.profile_iterations) for name, fn in fns.items()
                }
                print(f"\n{preset}, batch {batch}, {args.threads} threads")
                print_profile(entry["profile"])
            else:
                rows = summarise(abba_rounds(fns, args.rounds, args.warmup))
                entry["rows"] = rows
                print_table(
                    f"{preset}, batch {batch}, {args.threads} threads, {args.rounds} ABBA rounds",
                    rows,
                    skipped,
                )
            results.append(entry)
    path = write_json(
        args.out,
        {
            "machine": machine,
            "settings": vars(args) | {"authors_code": str(args.authors_code), "out": str(args.out)},
            "results": results,
        },
        indent=2,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
