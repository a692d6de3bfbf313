"""Training-recipe building blocks: callbacks, parameter groups without decay, EMA, time budgets, presets."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from m2det.engine.callbacks import Callback, EarlyStopping, ModelEMA
from m2det.engine.checkpoint_state import LAST_MODEL, load_checkpoint
from m2det.engine.finetune import no_decay_names, parameter_groups
from m2det.engine.schedule import LRSchedule, TimeBudget, build_scheduler
from m2det.engine.train import Trainer
from m2det.engine.train_config import DEFAULT_PRESET, PAPER_RECIPE, TrainConfig, get_train_config
from m2det.io.checkpoint import load_weights
from train_helpers import ToyBoxes, tiny_cli_data, tiny_model, weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**overrides) -> TrainConfig:
    base = dict(
        epochs=2, batch_size=4, lr=0.02, warmup_epochs=1, milestones=[], workers=0, eval_every=0, log_every=1
    )
    return TrainConfig(**{**base, **overrides}).validate()


def _trainer(run_dir, config: TrainConfig, model=None, **kwargs) -> Trainer:
    return Trainer(
        model or tiny_model(),
        config,
        ToyBoxes(8, flip=True),
        run_dir=run_dir,
        device="cpu",
        progress=False,
        **kwargs,
    )


# ----- callbacks -----
class Recorder(Callback):
    """Writes down every hook it sees, with the run's epoch and step at that moment."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int]] = []

    def _note(self, hook: str, run) -> None:
        self.seen.append((hook, run.epoch, run.step))

    def on_train_start(self, run):
        self._note("train_start", run)

    def on_epoch_start(self, run):
        self._note("epoch_start", run)

    def on_step_end(self, run, losses):
        assert set(losses) == {"loss", "loss_box", "loss_cls"} and all(v > 0 for v in losses.values())
        self._note("step_end", run)

    def on_validation_end(self, run, metrics):
        self._note("validation_end", run)

    def on_epoch_end(self, run):
        self._note("epoch_end", run)

    def on_train_end(self, run):
        self._note("train_end", run)


def test_callback_hooks_run_in_order_with_the_run_counters(tmp_path):
    recorder = Recorder()
    result = _trainer(tmp_path / "run", _config(), callbacks=[recorder]).fit()
    assert result.finished and result.stop_reason is None
    # 8 images, batch 4: two steps per epoch; no val_set, so no validation hooks
    assert recorder.seen == [
        ("train_start", 0, 0),
        ("epoch_start", 0, 0),
        ("step_end", 0, 1),
        ("step_end", 0, 2),
        ("epoch_end", 1, 2),
        ("epoch_start", 1, 2),
        ("step_end", 1, 3),
        ("step_end", 1, 4),
        ("epoch_end", 2, 4),
        ("train_end", 2, 4),
    ]


class StopAfterFirstEpoch(Callback):
    def on_epoch_end(self, run):
        run.request_stop("enough")


def test_a_callback_ends_the_run_and_a_resume_keeps_it_ended(tmp_path):
    run = tmp_path / "run"
    result = _trainer(run, _config(epochs=5), callbacks=[StopAfterFirstEpoch()]).fit()
    assert (result.epoch, result.finished, result.stop_reason) == (1, True, "enough")
    recorder = Recorder()
    again = _trainer(run, _config(epochs=5), callbacks=[recorder]).fit(resume=True)
    assert (again.epoch, again.finished, again.stop_reason) == (1, True, "enough")
    assert [hook for hook, _, _ in recorder.seen] == ["train_start", "train_end"]


def test_early_stopping_counts_epochs_since_the_best():
    stops: list[str] = []
    run = SimpleNamespace(
        config=SimpleNamespace(best_metric="AP50"), best_metric=0.4, best_epoch=3, request_stop=stops.append
    )
    stopping = EarlyStopping(patience=2)
    for epoch in (3, 4):  # 0 and 1 epochs without improvement
        run.epoch = epoch
        stopping.on_validation_end(run, {})
    assert stops == []
    run.epoch = 5
    stopping.on_validation_end(run, {})
    assert len(stops) == 1 and "AP50 has not improved for 2 epochs" in stops[0] and "epoch 3" in stops[0]
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(0)
    with pytest.raises(ValueError, match=r"train.patience must be >= 0"):
        _config(patience=-1)


# ----- parameter groups without weight decay -----
class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)  # weight decays, bias does not
        self.bn = nn.BatchNorm2d(3)  # neither weight nor bias decays
        self.head = nn.Linear(3, 2, bias=False)


def test_no_decay_groups_spare_biases_and_norms_and_keep_the_lr_multipliers():
    model = Small()
    assert no_decay_names(model) == {"conv.bias", "bn.weight", "bn.bias"}
    assert len(parameter_groups(model, {}, no_decay_norm_bias=False)) == 1  # today's single group
    groups = parameter_groups(model, {"head": 0.5, "bn": 0.5}, no_decay_norm_bias=True)
    by_id = {id(p): n for n, p in model.named_parameters()}
    layout = [
        (g["lr_mult"], g.get("weight_decay"), sorted(by_id[id(p)] for p in g["params"])) for g in groups
    ]
    assert layout == [
        (1.0, None, ["conv.weight"]),
        (1.0, 0.0, ["conv.bias"]),
        (0.5, None, ["head.weight"]),
        (0.5, 0.0, ["bn.bias", "bn.weight"]),
    ]
    # an SGD step without gradient: only weight decay moves a parameter
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
        nn.init.constant_(param, 1.0)
    optimizer = _config(weight_decay=0.1).build_optimizer(groups)
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, torch.ones_like(p))}
    assert moved == {"conv.weight", "head.weight"}


def test_the_trainer_uses_the_no_decay_groups(tmp_path):
    seen = []

    class Groups(Callback):
        def on_train_start(self, run):
            seen.extend((g["lr_mult"], g["weight_decay"]) for g in run.optimizer.param_groups)

    config = _config(epochs=1, no_decay_norm_bias=True, lr_mults={"backbone": 0.1}, weight_decay=5e-4)
    _trainer(tmp_path / "run", config, callbacks=[Groups()]).fit()
    assert seen == [(1.0, 5e-4), (1.0, 0.0), (0.1, 5e-4), (0.1, 0.0)]


# ----- EMA of the weights -----
def test_model_ema_follows_the_ultralytics_rule():
    model = Small()
    ema = ModelEMA(model, decay=0.9, tau=3.0)
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    expected = dict(start)
    gen = torch.Generator().manual_seed(0)
    for update in range(1, 6):
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(torch.randn(param.shape, generator=gen))
            model.bn.running_mean.copy_(torch.randn(3, generator=gen))
        ema.update(model)
        d = 0.9 * (1.0 - math.exp(-update / 3.0))  # by the formula, in double precision
        for name, param in model.named_parameters():
            expected[name] = d * expected[name] + (1.0 - d) * param.detach().double()
        averaged = dict(ema.module.named_parameters())
        for name in expected:
            assert torch.allclose(averaged[name].double(), expected[name], atol=1e-6), (update, name)
        # buffers are copied, not averaged
        assert torch.equal(ema.module.bn.running_mean, model.bn.running_mean)
        assert ema.module.bn.num_batches_tracked == model.bn.num_batches_tracked
    assert ema.updates == 5 and ema.decay_at(1) == pytest.approx(0.9 * (1 - math.exp(-1 / 3)))
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    # ultralytics' defaults: the first update is almost all model, d(1) = 0.9999 * (1 - e^(-1/2000))
    assert ModelEMA(model, 0.9999, 2000).decay_at(1) == pytest.approx(4.99825e-4, rel=1e-4)


def test_ema_is_what_is_saved_and_a_resume_continues_it_exactly(tmp_path):
    config = _config(ema=True, ema_decay=0.9, ema_tau=2.0)
    whole = tiny_model()
    _trainer(tmp_path / "whole", config, whole).fit()
    state = load_checkpoint(tmp_path / "whole").state
    assert state["callbacks"] == {"0:EMA": {"updates": 4}}  # 2 epochs of 2 steps
    reloaded = tiny_model(seed=7)
    load_weights(reloaded, tmp_path / "whole" / LAST_MODEL)
    saved, trained = weights(reloaded), state["train_model"]
    moving = [k for k in trained if k.endswith(".weight") and "bn" not in k]
    assert any(not torch.equal(saved[k], trained[k]) for k in moving)  # the file holds the average...
    assert all(torch.equal(saved[k], trained[k]) for k in trained if "running_" in k)  # buffers copied
    assert all(torch.equal(v, saved[k]) for k, v in weights(whole).items())  # ... and so does the model

    split = tmp_path / "split"
    _trainer(split, config).fit(stop_at_epoch=1)
    resumed = tiny_model(seed=123)
    result = _trainer(split, config, resumed).fit(resume=True)
    assert (result.epoch, result.step) == (2, 4)
    assert all(torch.equal(v, saved[k]) for k, v in weights(resumed).items())
    resumed_state = load_checkpoint(split).state
    assert all(torch.equal(resumed_state["train_model"][k], v) for k, v in trained.items())
    with pytest.raises(ValueError, match=r"train.ema_decay must be in \(0, 1\)"):
        _config(ema_decay=1.0)


# ----- a time budget -----
class FakeClock:
    """Time that passes only when told: `seconds_per_forward` at every forward of the model."""

    def __init__(self, seconds_per_forward: float) -> None:
        self.now, self.per_forward = 1000.0, seconds_per_forward

    def __call__(self) -> float:
        return self.now

    def attach(self, model: nn.Module) -> nn.Module:
        model.register_forward_pre_hook(lambda *_: setattr(self, "now", self.now + self.per_forward))
        return model


class Rates(Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_step_end(self, run, losses):
        self.rates.append(run.optimizer.param_groups[0]["lr"])  # the rate of the next step


def test_time_budget_arithmetic():
    clock = FakeClock(0)
    budget = TimeBudget(120.0, clock, spent_before=30.0)
    clock.now += 45.0
    assert budget.elapsed() == 75.0 and budget.fraction(75.0) == 0.625 and budget.fraction(500.0) == 1.0
    schedule = LRSchedule(lr=0.1, epochs=10, warmup_epochs=2, warmup_start_lr=0.0, policy="cosine")
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    spent = [0.0]
    scheduler = build_scheduler(optimizer, schedule, steps_per_epoch=1000, budget_spent=lambda: spent[0])
    assert optimizer.param_groups[0]["lr"] == 0.0
    for fraction, rate in [(0.1, 0.05), (0.2, 0.1), (0.6, 0.05), (1.0, 0.0)]:
        spent[0] = fraction  # 10% of the budget is epoch 1 of 10: halfway through the 2 warm-up epochs
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(rate, abs=1e-12), fraction
    with pytest.raises(ValueError, match=r"train.time_limit_min must be > 0 minutes"):
        _config(time_limit_min=0)


def test_a_time_budget_fits_the_schedule_and_ends_the_run(tmp_path):
    # one minute; each step (one forward) takes 7 s: the budget is spent during step 9, in epoch 5
    config = _config(time_limit_min=1.0, epochs=10, warmup_epochs=1, warmup_start_lr=0.0, policy="cosine")
    clock, rates = FakeClock(7.0), Rates()
    whole = clock.attach(tiny_model())
    result = _trainer(tmp_path / "whole", config, whole, callbacks=[rates], clock=clock).fit()
    assert (result.epoch, result.step, result.finished) == (5, 9, True)
    schedule = config.schedule()
    assert rates.rates == pytest.approx([schedule.lr_at(10 * min(7 * k / 60, 1.0)) for k in range(1, 10)])
    assert rates.rates[-1] == 0.0  # the cosine ended with the budget
    assert load_checkpoint(tmp_path / "whole").state["elapsed_s"] == 63.0

    # paused after epoch 2 and resumed with another clock: the budget goes on where it was
    clock = FakeClock(7.0)
    first = _trainer(tmp_path / "split", config, clock.attach(tiny_model()), clock=clock)
    assert not first.fit(stop_at_epoch=2).finished
    assert load_checkpoint(tmp_path / "split").state["elapsed_s"] == 28.0
    clock = FakeClock(7.0)
    resumed = clock.attach(tiny_model(seed=3))
    result = _trainer(tmp_path / "split", config, resumed, clock=clock).fit(resume=True)
    assert (result.epoch, result.step, result.finished) == (5, 9, True)
    assert all(torch.equal(v, weights(whole)[k]) for k, v in weights(resumed).items())


# ----- presets -----
def test_the_paper_preset_is_the_paper_and_the_field_defaults():
    paper = get_train_config("paper")
    assert paper == TrainConfig()  # a stored run's missing fields must mean the paper's "off"
    # the paper's numbers ...
    assert (paper.optimizer, paper.momentum, paper.weight_decay, paper.lr, paper.batch_size) == (
        "sgd",
        0.9,
        5e-4,
        2e-3,
        32,
    )
    assert (paper.warmup_epochs, paper.policy, paper.milestones, paper.gamma, paper.epochs) == (
        5.0,
        "step",
        [90, 120],
        0.1,
        150,
    )
    # ... and none of the additions
    additions = ("ema", "no_decay_norm_bias", "label_smoothing", "box_loss", "matcher", "mosaic", "mixup")
    assert [getattr(paper, k) for k in additions] == [False, False, 0.0, "smooth_l1", "iou", 0.0, 0.0]
    assert (paper.multiscale_sizes, paper.time_limit_min, paper.patience) == ([], None, 0)
    # every field that shapes what is learnt is spelled out, so new field defaults cannot change it;
    # the rest run the training (or tune an option the recipe leaves off)
    operational = {
        "workers",
        "amp",
        "eval_every",
        "save_every",
        "best_metric",
        "seed",
        "sync_bn",
        "loss_limit",
    }
    operational |= {
        "log_every",
        "tensorboard",
        "freeze_bn",
        "freeze_backbone_epochs",
        "freeze_backbone_bn",
        "lr_mults",
    }
    operational |= {"patience", "time_limit_min", "ema_decay", "ema_tau", "atss_topk", "close_mosaic"}
    assert set(PAPER_RECIPE) | operational == {f.name for f in dataclasses.fields(TrainConfig)}
    # every preset starts from the paper's recipe, whatever the field defaults
    assert get_train_config("official").momentum == 0.9 and get_train_config("official").epochs == 160


def test_the_default_preset_is_the_benchmarked_adamw_cosine_recipe_at_every_instant_of_a_budget():
    """benchmarks/recipes_bccd.py first measured the recipe as overrides of the paper's with a 12-epoch
    schedule; the preset stretches 120 epochs with a 10-epoch warm-up onto a time budget: the same."""
    assert DEFAULT_PRESET == "adamw_cosine"  # the winner of the recipe benchmark (docs/train.md)
    preset = get_train_config("adamw_cosine", time_limit_min=15.0)
    as_measured = get_train_config(
        "paper",
        optimizer="adamw",
        lr=2e-3,
        weight_decay=0.05,
        batch_size=8,
        epochs=12,
        warmup_epochs=1.0,
        warmup_start_lr=2e-4,
        policy="cosine",
        milestones=[],
        min_lr=0.0,
        clip_grad=10.0,
        time_limit_min=15.0,
    )
    differ = {
        f.name
        for f in dataclasses.fields(TrainConfig)
        if getattr(preset, f.name) != getattr(as_measured, f.name)
    }
    assert differ == {"epochs", "warmup_epochs"}
    for spent in (0.0, 0.02, 1 / 12, 0.3, 0.5, 0.77, 1.0):
        rates = [c.schedule().lr_at(c.epochs * spent) for c in (preset, as_measured)]
        assert rates[0] == pytest.approx(rates[1], rel=1e-12, abs=1e-15)
    assert preset.schedule().lr_at(0.0) == 2e-4 and preset.schedule().lr_at(120.0) == 0.0


def test_the_default_preset_repeats_under_a_seed_and_other_seeds_differ(tmp_path):
    def trained(seed: int, name: str) -> dict:
        config = get_train_config(DEFAULT_PRESET, epochs=2, batch_size=4, workers=0, seed=seed)
        model = tiny_model(seed=0)  # the same start: only the training's own randomness differs
        _trainer(tmp_path / name, config, model).fit()
        return weights(model)

    first, again, other = trained(5, "a"), trained(5, "b"), trained(6, "c")
    assert all(torch.equal(v, again[k]) for k, v in first.items())
    assert not all(torch.equal(v, other[k]) for k, v in first.items())


def test_the_modern_preset_turns_the_new_blocks_on():
    modern = get_train_config("modern", epochs=40)
    assert (modern.optimizer, modern.policy, modern.epochs, modern.milestones) == ("adamw", "cosine", 40, [])
    assert modern.ema and modern.no_decay_norm_bias and modern.warmup_epochs > 0
    assert (modern.box_loss, modern.matcher) == ("giou", "atss") and 0 < modern.label_smoothing <= 0.1
    assert modern.mosaic == 1.0 and 0 < modern.close_mosaic < modern.epochs


def test_the_paper_loss_is_the_models_own_bit_for_bit():
    model = tiny_model()
    gen = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 64, 64), generator=gen, dtype=torch.uint8) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0], [2.0, 2.0, 12.0, 9.0]]),
            "labels": torch.tensor([2, 1]),
        },
    ]
    model.train()
    default = model(images, targets)
    model.loss_fn = get_train_config("paper").build_loss(model)
    configured = model(images, targets)
    assert all(torch.equal(default[k], configured[k]) for k in default)
    with pytest.raises(ValueError, match=r"train.matcher must be one of \('iou', 'atss'\), got 'atts'"):
        _config(matcher="atts")
    with pytest.raises(ValueError, match=r"train.box_loss must be one of"):
        _config(box_loss="l1")


def test_set_train_preset_replaces_the_files_preset_and_keeps_its_fields(tmp_path):
    from m2det.cli.train import load_configs

    _, config = load_configs(None, "m2det_tiny", {}, {"preset": "modern", "epochs": 7})
    assert config == get_train_config("modern", epochs=7)
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  preset: paper\n  batch_size: 8\n")
    _, config = load_configs(path, "m2det_tiny", {}, {"preset": "modern"})
    assert config == get_train_config("modern", batch_size=8)
    with pytest.raises(ValueError, match=r"cfg.yaml: unknown training preset 'moden'"):
        load_configs(path, "m2det_tiny", {}, {"preset": "moden"})


def test_train_cli_time_budget_and_preset(tmp_path):
    from typer.testing import CliRunner

    from m2det.cli.main import app

    data, config = tiny_cli_data(tmp_path, "train:\n  batch_size: 4\n  workers: 0\n")
    args = ["train", "--data", str(data.train.annotations), "--val-data", str(data.val.annotations)]
    args += ["--config", str(config), "--set", "train.preset=modern", "--set", "train.batch_size=4"]
    args += ["--time", "0.01", "--device", "cpu", "--project", str(tmp_path / "runs"), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    state = load_checkpoint(tmp_path / "runs" / "exp1").state
    assert state["train_config"]["time_limit_min"] == 0.01 and state["train_config"]["optimizer"] == "adamw"
    assert state["elapsed_s"] >= 0.6 and state["stop_reason"] is None
    again = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "runs" / "exp1"), "--time", "1"])
    assert again.exit_code == 2 and "--time" in again.output
