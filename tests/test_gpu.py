"""The CUDA paths: AMP with a GradScaler in training, fp16/bf16 inference, CUDA graphs.

Written to run on a CUDA machine and skipped elsewhere (CPU-only CI covers everything else).
"""

from __future__ import annotations

import pytest
import torch

import m2det
from m2det.deploy import optimize_for_inference
from m2det.engine.callbacks import Callback
from m2det.engine.train import Trainer
from m2det.engine.train_config import TrainConfig
from train_helpers import ToyBoxes, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _tiny_on_cuda() -> torch.nn.Module:
    torch.manual_seed(0)
    return m2det.build_model("m2det_tiny", num_classes=4).cuda().eval()


def test_amp_training_step_uses_the_grad_scaler(tmp_path):
    config = TrainConfig(epochs=1, batch_size=4, lr=0.01, warmup_epochs=0, milestones=[1], workers=0,
                         eval_every=0, amp=True).validate()  # fmt: skip
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: dict[str, object] = {}

    class Probe(Callback):
        def on_step_end(self, run, losses) -> None:
            seen["amp"], seen["scale"] = run.use_amp, run.scaler.get_scale()

    result = Trainer(model, config, ToyBoxes(8), run_dir=tmp_path / "run", device="cuda", progress=False,
                     callbacks=[Probe()]).fit()  # fmt: skip
    assert result.finished and seen["amp"] is True
    assert seen["scale"] > 0  # an enabled scaler has a scale; a disabled one reports 1.0 and does nothing
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before if before[k].is_floating_point())
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_inference_is_close_to_fp32(precision):
    model = _tiny_on_cuda()
    size = model.config.input_size
    x = torch.rand(2, 3, size, size, device="cuda")
    with torch.inference_mode():
        loc, logits = model.forward_raw(x)
    fast = optimize_for_inference(model, precision=precision, compile=False)
    loc_r, logits_r = fast.forward_raw(x)
    assert loc_r.shape == loc.shape and logits_r.shape == logits.shape
    assert torch.isfinite(loc_r).all() and torch.isfinite(logits_r).all()
    tolerance = 0.05 if precision == "fp16" else 0.2  # bf16 keeps 8 mantissa bits
    assert (loc_r.float() - loc).abs().max().item() < tolerance * max(1.0, loc.abs().max().item())
    probs, probs_r = logits.softmax(-1), logits_r.float().softmax(-1)
    assert (probs_r - probs).abs().max().item() < tolerance


def test_cuda_graphs_replay_equals_eager():
    model = _tiny_on_cuda()
    size = model.config.input_size
    x = torch.rand(1, 3, size, size, device="cuda")
    with torch.inference_mode():
        loc, logits = model.forward_raw(x)
    fast = optimize_for_inference(model, cuda_graphs=True)
    for _ in range(3):  # the first calls record the graph; later ones replay it
        loc_g, logits_g = fast.forward_raw(x)
    torch.testing.assert_close(loc_g.float(), loc, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(logits_g.float(), logits, rtol=1e-3, atol=1e-3)
