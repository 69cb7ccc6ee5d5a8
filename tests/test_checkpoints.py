import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from workbench.checkpoints import CheckpointError, atomic_write, read_state_dict, save_weights
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


# A child process that overwrites a checkpoint with new weights through atomic_write, slowly: the
# safetensors bytes go out in 1 MiB chunks, each flushed to the file. It prints the path it writes
# to once the first chunk is on disk, so that the test can kill it in the middle of the write.
SLOW_WRITER = """
import sys, time
import torch
from safetensors.torch import save
from workbench.checkpoints import atomic_write

data = save({"weight": torch.full((16 * 2**20,), 7.0)})  # 64 MiB
chunk = 2**20

def write(tmp):
    with open(tmp, "wb") as fh:
        for start in range(0, len(data), chunk):
            fh.write(data[start:start + chunk])
            fh.flush()
            if start == 0:
                print("writing", tmp, len(data), flush=True)
            time.sleep(0.02)

atomic_write(sys.argv[1], write)
print("done", flush=True)
"""


def test_interrupted_write_keeps_the_old_file(tmp_path):
    old = {"weight": torch.randn(1000), "bias": torch.arange(10.0)}
    path = save_weights(old, tmp_path / "w.safetensors")
    before = path.read_bytes()

    writer = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        line = writer.stdout.readline().split()
        assert line[:1] == ["writing"], f"the writer did not start writing: {line}, exit code {writer.wait()}"
        writing, total = Path(line[1]), int(line[2])
        first = writing.stat().st_size
        deadline = time.monotonic() + 30
        while writing.stat().st_size <= first:  # the write is under way: kill it in the middle
            assert time.monotonic() < deadline, "the file being written did not grow"
            time.sleep(0.005)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        writer.stdout.close()
    assert writer.returncode == -signal.SIGKILL
    assert writing.stat().st_size < total, "the writer finished before it was killed"

    assert path.read_bytes() == before, "a killed write changed the checkpoint at the target path"
    state = read_state_dict(path)
    assert set(state) == set(old) and all(torch.equal(state[k], old[k]) for k in old)
    # what the killed writer leaves is a hidden temporary file, never a file that could pass for a checkpoint
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p != path)
    assert all(name.startswith(".w.safetensors.") and name.endswith(".tmp") for name in leftovers), leftovers


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = save_weights(TinyNet(), tmp_path / "w.safetensors")
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_weights({"a": torch.zeros(2), "b": "not a tensor"}, path)
    with pytest.raises(ZeroDivisionError):
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"half") and 1 / 0)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002], ids=oct)
def test_atomic_write_gives_the_permissions_of_a_plain_open(tmp_path, mask):
    previous = os.umask(mask)
    try:
        (tmp_path / "plain.txt").write_text("x")
        written = atomic_write(tmp_path / "atomic.txt", lambda tmp: Path(tmp).write_text("x"))
        weights = save_weights(TinyNet(), tmp_path / "w", metadata={"epoch": 1})
    finally:
        os.umask(previous)
    plain = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert plain == 0o666 & ~mask
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in (written, weights, tmp_path / "w.json")}
    assert modes == dict.fromkeys(modes, oct(plain))


FSYNC_WRITER = """
import sys
from pathlib import Path
from workbench.checkpoints import atomic_write

atomic_write(sys.argv[1], lambda tmp: Path(tmp).write_text("new"))
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to watch the system calls")
def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after_it(tmp_path):
    """A power loss must leave the old file or the new one: seen in the system calls the write makes."""
    target = tmp_path / "state.json"
    target.write_text("old")
    log = tmp_path / "strace.log"
    watched = "trace=fsync,fdatasync,rename,renameat,renameat2"
    subprocess.run(["strace", "-f", "-y", "-qq", "-o", str(log), "-e", watched, sys.executable, "-c", FSYNC_WRITER,
                    str(target)], check=True, timeout=120)
    assert target.read_text() == "new"
    calls = [line.split(None, 1)[1] for line in log.read_text().splitlines() if str(tmp_path) in line]
    renames = [i for i, call in enumerate(calls) if call.startswith("rename") and f'"{target}"' in call]
    assert len(renames) == 1, calls
    synced_tmp = [i for i, call in enumerate(calls) if call.startswith(("fsync(", "fdatasync("))
                  and ".state.json." in call and ".tmp>" in call]
    synced_dir = [i for i, call in enumerate(calls) if call.startswith("fsync(") and f"<{tmp_path}>" in call]
    assert synced_tmp and synced_tmp[0] < renames[0], f"the temporary file is not synced before the rename: {calls}"
    assert synced_dir and synced_dir[-1] > renames[0], f"the folder is not synced after the rename: {calls}"
