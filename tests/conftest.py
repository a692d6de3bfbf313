"""Shared fixtures: random checkpoints in the official layout (package data), the BCCD subset in tests/data."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from m2det.io.official import official_layout

BCCD = Path(__file__).resolve().parent / "data" / "bccd"


def pytest_configure(config: pytest.Config) -> None:
    # OpenVINO's converter imports absl where it is installed (tensorboard brings it), and absl's log
    # handler closes its stream when closed unless that stream is the current sys.stderr. `m2det
    # serve` under CliRunner (sys.stderr swapped) makes uvicorn set up logging, which closes every
    # handler: absl's would close pytest's capture file and end the session. The real stderr is one
    # it never closes.
    if importlib.util.find_spec("absl") is not None:
        import absl.logging

        absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__


def random_official_state_dict(
    backbone: str = "vgg16", seed: int = 0, num_classes: int = 81
) -> dict[str, torch.Tensor]:
    """Random values in the authors' layout; the shared `leach` copies hold one value as in real files."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in official_layout(backbone).items():
        if key.startswith("conf."):
            shape = ((shape[0] // 81) * num_classes, *shape[1:])
        if key.startswith("leach.") and not key.startswith("leach.0."):
            state[key] = state["leach.0." + key.split(".", 2)[2]].clone()
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100)
        elif key.endswith("running_var") or key.endswith(("bn.weight", "Norm.weight")):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
            state[key] = torch.randn(shape, generator=gen) * (1.0 / fan_in) ** 0.5
    return state


@pytest.fixture(scope="session")
def bccd_root() -> Path:
    """11 BCCD images in VOC layout (train 4, val 4, test 3) with the data set's two degenerate boxes."""
    return BCCD


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; more threads than free cores make them crawl."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _restore_sigchld():
    """Each test ends with the SIGCHLD handler it started with. A DataLoader with workers installs
    torch's own handler in this process and never removes it; a later test whose child process
    exits (mp.spawn, subprocess) then ran that handler on stale worker state and the whole pytest
    process segfaulted (seen on CI in test_ddp after the CLI tests ran eval with workers)."""
    import signal

    before = signal.getsignal(signal.SIGCHLD)
    yield
    signal.signal(signal.SIGCHLD, before)
