"""A process SIGKILLed while it writes a large checkpoint leaves the previous one intact and loadable.

The writer is a real process running the real ``save_weights`` (safetensors) and ``save_state`` (the
``last.pt`` resume state ``wb.fit`` writes) on a ~100 MB state, over and over, each version filled
with its number. The test kills it while a temporary file is being written, then loads the
checkpoint: it must be the last version that was complete, whole.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from workbench.checkpoints import load_state, read_state_dict

WRITER = """
import sys, torch
from workbench.checkpoints import save_state, save_weights

path, kind = sys.argv[1], sys.argv[2]
for version in range(1, 1000):
    state = {f"layer{i}.weight": torch.full((1024, 1024 * 6), float(version)) for i in range(4)}  # 4 x 24 MiB
    if kind == "weights":
        save_weights(state, path)
    else:
        save_state({"model": state, "epoch": version}, path)
    print(version, flush=True)
"""

N_VALUES = 4 * 1024 * 1024 * 6


def load(path: Path, kind: str) -> tuple[dict, int | None]:
    if kind == "weights":
        return read_state_dict(path), None
    state = load_state(path)
    return state["model"], state["epoch"]


@pytest.mark.parametrize("kind", ["weights", "resume_state"])
def test_sigkill_during_a_large_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, kind):
    path = tmp_path / ("model.safetensors" if kind == "weights" else "last.pt")
    for attempt in range(5):  # a kill that lands between two writes proves nothing: try again
        for stale in tmp_path.glob(f".{path.name}.*.tmp"):
            stale.unlink()
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), kind], stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout.readline().strip() == "1", "the first checkpoint was not written"
            deadline = time.monotonic() + 60
            while True:  # wait until the next version is being written into its temporary file, then kill
                partial = [p for p in tmp_path.glob(f".{path.name}.*.tmp") if 0 < p.stat().st_size]
                if partial:
                    break
                assert time.monotonic() < deadline and writer.poll() is None, "no second write started"
                time.sleep(0.001)
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=30)
            completed = [int(line) for line in writer.stdout.read().split()]
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
            writer.stdout.close()
        assert writer.returncode == -signal.SIGKILL
        leftovers = list(tmp_path.glob(f".{path.name}.*.tmp"))
        if leftovers:  # killed inside atomic_write, before the rename
            break
    else:
        pytest.fail("the kill never landed inside a write")

    last_complete = 1 + len(completed)
    state, epoch = load(path, kind)  # loadable, with no error
    assert sorted(state) == [f"layer{i}.weight" for i in range(4)]
    assert sum(t.numel() for t in state.values()) == N_VALUES
    # the whole previous checkpoint: one version throughout, the last one that completed
    values = torch.unique(torch.cat([t.flatten() for t in state.values()]))
    assert values.tolist() == [float(last_complete)]
    if epoch is not None:
        assert epoch == last_complete
    # what the kill left is a hidden temporary file, which no loader would take for a checkpoint
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [path.name]


STEPPED_WRITER = """
import os, signal, sys, torch
from workbench.checkpoints import save_weights

path, kill_at = sys.argv[1], int(sys.argv[2])
save_weights({"w": torch.full((1000,), 1.0)}, path, metadata={"version": 1})
steps = []

def counted(step):  # every rename or removal of the second save is a point where the process can die
    def wrapped(*args, **kwargs):
        steps.append(step.__name__)
        if len(steps) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(*args, **kwargs)
    return wrapped

os.replace, os.rename, os.unlink, os.remove = (counted(f) for f in (os.replace, os.rename, os.unlink, os.remove))
save_weights({"w": torch.full((1000,), 2.0)}, path, metadata={"version": 2})
print("finished", len(steps), flush=True)
"""


def test_a_kill_between_the_weights_and_their_metadata_never_pairs_new_weights_with_old_metadata(tmp_path):
    """Issue 21 item 14: the weights and the .json sidecar were two renames; a kill between them left the new
    weights beside the old metadata. Killed before each rename/removal of a save, the weights on disk and
    every metadata that can be read about them must be of the same version."""
    kill_at, seen_kill = 1, 0
    while True:
        folder = tmp_path / f"kill{kill_at}"
        folder.mkdir()
        path = folder / "model.safetensors"
        done = subprocess.run([sys.executable, "-c", STEPPED_WRITER, str(path), str(kill_at)], capture_output=True,
                              text=True, timeout=120)
        weights = int(read_state_dict(path)["w"][0].item())
        sidecar = path.with_suffix(".json")
        if sidecar.exists():
            assert json.loads(sidecar.read_text())["version"] == weights, f"killed at step {kill_at}"
        from workbench.checkpoints import read_metadata

        assert read_metadata(path)["version"] == weights, f"killed at step {kill_at}"
        if done.returncode == 0:
            assert weights == 2 and "finished" in done.stdout
            break
        assert done.returncode == -signal.SIGKILL, done.stderr
        seen_kill += 1
        kill_at += 1
    assert seen_kill >= 2  # at least the weights' rename and the sidecar's were each a place to die


def test_metadata_of_files_written_before_it_went_into_the_header_is_read_from_the_sidecar(tmp_path):
    from safetensors.torch import save_file

    from workbench.checkpoints import read_metadata

    save_file({"w": torch.zeros(2)}, str(tmp_path / "old.safetensors"))
    (tmp_path / "old.json").write_text(json.dumps({"genes": ["A", "B"]}))
    assert read_metadata(tmp_path / "old.safetensors") == {"genes": ["A", "B"]}
    assert read_metadata(tmp_path / "missing.safetensors") == {}
