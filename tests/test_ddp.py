"""DDP: two gloo processes on the CPU end with identical weights, equal to one process on the global batch.

What makes the comparison exact up to float rounding:
* BatchNorm is kept in eval mode (`freeze_bn`): in train mode each process would normalise with the
  statistics of its half batch, which differ from the global batch's (SyncBatchNorm would fix that
  but PyTorch implements it for GPUs only).
* The multibox loss divides each process's sum by the positive count averaged over the processes,
  and DDP averages the gradients, which equals the global-batch gradient however the boxes are
  shared out; the images here have different boxes, so the halves have different counts.
* No augmentation; `DistributedSampler` gives the two processes the interleaved halves of the same
  shuffled global batch the single process sees.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ddp_helpers import free_port, join_as_rank
from m2det.engine.checkpoint_state import load_checkpoint
from m2det.engine.train import Trainer
from m2det.engine.train_config import TrainConfig
from train_helpers import ToyBoxes, tiny_model, weights

CONFIG = dict(
    epochs=2,
    batch_size=4,
    lr=0.01,
    warmup_epochs=0,
    milestones=[],
    workers=0,
    eval_every=0,
    freeze_bn=True,
    clip_grad=1.0,
)
TOLERANCE = dict(rtol=1e-4, atol=1e-6)  # float sums in another order; observed differences ~3e-8


pytestmark = pytest.mark.usefixtures("one_thread")


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    join_as_rank(rank, world_size, port)
    model = tiny_model(seed=rank)  # different initial weights per rank: DDP must broadcast rank 0's
    Trainer(
        model,
        TrainConfig(**CONFIG),
        ToyBoxes(count=8, same_layout=False),
        run_dir=f"{out_dir}/run",
        device="cpu",
        progress=False,
    ).fit()
    torch.save(weights(model), f"{out_dir}/rank{rank}.pt")


def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    # In a fresh interpreter, as a user's torchrun starts it: no handler or thread pool that earlier
    # tests left in the pytest process (torch's DataLoader SIGCHLD handler made it segfault here;
    # conftest's _restore_sigchld now removes it after each test).
    import os
    import subprocess
    import sys

    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, *sys.path])}
    code = f"import test_ddp; test_ddp.check_two_processes_match_one({str(tmp_path)!r})"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tests, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]


def check_two_processes_match_one(out: str) -> None:
    tmp_path = Path(out)
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "ranks diverged"
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"last.safetensors", "results.csv"}
    assert len(load_checkpoint(tmp_path / "run").state["rng"]) == 2  # both processes' generators

    single = tiny_model(seed=0)
    initial = weights(single)
    Trainer(
        single,
        TrainConfig(**CONFIG),
        ToyBoxes(count=8, same_layout=False),
        run_dir=tmp_path / "single",
        device="cpu",
        progress=False,
    ).fit()
    expected = weights(single)
    moved = max(
        float((expected[k] - initial[k]).abs().max()) for k in expected if expected[k].is_floating_point()
    )
    assert moved > 1e-3, "the weights barely moved; the comparison would prove nothing"
    for key in expected:
        torch.testing.assert_close(
            rank0[key], expected[key], **TOLERANCE, msg=f"{key} differs from one process"
        )


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
