import json
import os

import pytest
import torch

from workbench.checkpoints import CheckpointError, read_state_dict, save_weights
from workbench.transfer import load_pretrained

from .helpers import TinyNet


def test_safetensors_roundtrip_with_sidecar_and_no_temp_files(tmp_path):
    model = TinyNet()
    path = save_weights(model, tmp_path / "w", metadata={"epoch": 3})
    assert path.name == "w.safetensors"
    assert json.loads((tmp_path / "w.json").read_text()) == {"epoch": 3}
    state = read_state_dict(path)
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json", "w.safetensors"]


@pytest.mark.parametrize("wrap", ["state_dict", "model", "model_state_dict"])
def test_nested_torch_checkpoints_are_unwrapped(tmp_path, wrap):
    model = TinyNet()
    torch.save({wrap: model.state_dict(), "epoch": 7, "hyper_parameters": {"lr": 0.1}}, tmp_path / "x.ckpt")
    state = read_state_dict(tmp_path / "x.ckpt")
    assert set(state) == set(model.state_dict())


class _WritesFile:
    """A pickle payload that creates a file when it is unpickled."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "pwned.txt"
    ckpt = tmp_path / "evil.pt"
    torch.save({"state_dict": TinyNet().state_dict(), "payload": _WritesFile(str(target))}, ckpt)
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        load_pretrained(TinyNet(), ckpt)
    assert not target.exists()
    # The opt-in really does unpickle (which is why it must be explicit).
    read_state_dict(ckpt, trust_pickle=True)
    assert target.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_checkpoint_gives_an_error_naming_the_fix(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(TinyNet().state_dict(), path)
    else:
        save_weights(TinyNet(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "corrupted or truncated" in message and "Re-create it" in message and str(len(data) // 2) in message


def test_missing_file_and_non_weight_content(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pt")
    torch.save({"config": {"a": 1}}, tmp_path / "cfg.pt")
    with pytest.raises(CheckpointError, match="No weights found"):
        read_state_dict(tmp_path / "cfg.pt")


def test_interrupted_write_keeps_the_old_file(tmp_path):
    path = save_weights(TinyNet(), tmp_path / "w.safetensors")
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_weights({"a": torch.zeros(2), "b": "not a tensor"}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))
