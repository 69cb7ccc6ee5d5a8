"""A process SIGKILLed while it writes a large checkpoint leaves the previous one intact and loadable.

The writer is a real process running the real ``save_weights`` (safetensors) and ``save_state`` (the
``last.pt`` resume state ``wb.fit`` writes) on a ~100 MB state, over and over, each version filled
with its number. The test kills it while a temporary file is being written, then loads the
checkpoint: it must be the last version that was complete, whole.
"""

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
