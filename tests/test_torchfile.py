"""Weight files load with weights_only, and a file that is not plain tensors is refused with our advice."""

from __future__ import annotations

import pytest
import torch

from m2det.engine.checkpoint_state import load_training_state
from m2det.io.torchfile import is_torch_file, load_state_dict_file


class Payload:
    """Unpickling this calls print: any code could stand in its place."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_both_torch_formats_load(tmp_path):
    state = {"conf.2.bias": torch.arange(6.0)}
    zipped, legacy = tmp_path / "zipped.pth", tmp_path / "legacy.pth"
    torch.save(state, zipped)
    # the authors saved with PyTorch 0.4: the legacy (pickle, not zip) format must read too
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert is_torch_file(zipped) and is_torch_file(legacy)
    assert torch.equal(load_state_dict_file(zipped)["conf.2.bias"], state["conf.2.bias"])
    assert torch.equal(load_state_dict_file(legacy)["conf.2.bias"], state["conf.2.bias"])


def test_pickled_objects_are_refused_without_inviting_weights_only_false(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    torch.save({"conf.0.weight": Payload()}, evil)
    with pytest.raises(ValueError) as info:
        load_state_dict_file(evil)
    message = str(info.value)
    assert message.startswith(f"{evil}: holds pickled Python objects (such as print), not only tensors")
    assert "Do NOT load it with torch.load(weights_only=False) unless you made the file yourself" in message
    assert "torch.save(model.state_dict(), 'weights.pth')" in message  # what to do instead
    assert "will likely succeed" not in message and "add_safe_globals" not in message  # torch's advice
    assert "this must never run" not in capsys.readouterr().out
    # a whole pickled model is refused naming its class; a training state meets the same refusal
    whole = tmp_path / "whole.pth"
    torch.save(torch.nn.Linear(2, 2), whole)
    with pytest.raises(
        ValueError,
        match=r"whole\.pth: holds pickled Python objects \(such as torch\.nn\.modules\.linear\.Linear\)",
    ):
        load_state_dict_file(whole)
    with pytest.raises(ValueError, match=r"evil\.pth: holds pickled Python objects"):
        load_training_state(evil)


def test_a_file_of_another_kind_is_named_before_loading(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("conf.0.weight 486x2048x3x3\n")
    assert not is_torch_file(notes)
    with pytest.raises(ValueError) as info:
        load_state_dict_file(notes)
    assert str(info.value) == (
        f"{notes}: not a PyTorch file (neither a torch.save zip archive nor a legacy pickle); "
        "expected a .pth/.pt file written by torch.save"
    )


def test_a_damaged_file_is_named(tmp_path):
    cut = tmp_path / "cut.pth"
    torch.save({"w": torch.zeros(100)}, cut)
    cut.write_bytes(cut.read_bytes()[:200])  # a download that stopped early
    with pytest.raises(ValueError, match=r"cut\.pth: cannot be read as a PyTorch file"):
        load_state_dict_file(cut)
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(100)}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"legacy\.pth: ends early; the file looks truncated"):
        load_state_dict_file(legacy)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x02" + b"\xff" * 30)  # a pickle header, then noise: damage, not objects
    with pytest.raises(
        ValueError,
        match=r"garbage\.pth: cannot be read as a PyTorch file, it looks damaged \(Unsupported operand 255\)$",
    ):
        load_state_dict_file(garbage)
