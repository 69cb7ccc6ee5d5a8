"""Fine-tune the regulatory model with LoRA in a separate process; optionally SIGKILL itself after an epoch.

Used by test_lora.py: ``python lora_resume_worker.py CSV RUN_DIR OUT KILL_AFTER RESUME``. Writes the
final weights of the whole model (base and adapters) and the epochs this process trained to OUT.
"""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.tasks import regulatory  # noqa: E402

TINY = {"width": 16, "layers": 1, "heads": 2, "fusion_hidden": 8, "condition_dim": 4}
EPOCHS = 4


class KillAfter(wb.Callback):
    """Records each epoch this process trains; SIGKILLs the process at the end of epoch ``epoch``."""

    def __init__(self, epoch, out):
        self.epoch, self.out, self.trained = epoch, Path(out), []

    def on_epoch_end(self, trainer, logs):
        self.trained.append(trainer.epoch)
        (self.out / "trained.json").write_text(json.dumps(self.trained))
        if trainer.epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def main(csv, run_dir, out, kill_after, resume):
    torch.set_num_threads(1)
    data = regulatory.load(csv, seed=0, label_fraction=0.5, val_fraction=0.25)
    torch.manual_seed(0)
    model = regulatory.build_model(data, **TINY)  # unknown_rate > 0: the forward draws random numbers
    run = wb.Run(run_dir, params={"case": "lora resume"}, resume=resume)
    wrapped, _ = regulatory.prepare(model, method="lora", rank=2, run=run)
    regulatory.finetune(wrapped, data, epochs=EPOCHS, learning_rate=1e-2, batch_size=8, run=run, resume=resume,
                        callbacks=[KillAfter(kill_after, out)], progress=False)
    wb.save_weights(wb.unwrap(wrapped).state_dict(), Path(out) / "final.safetensors")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], int(a[3]), a[4] == "1")
