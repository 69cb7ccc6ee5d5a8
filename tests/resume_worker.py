"""Train TinyNet in a separate process; optionally SIGKILL itself after an epoch.

Used by test_training.py:
``python resume_worker.py RUN_DIR OUT EPOCHS FREEZE_EPOCHS KILL_AFTER RESUME [ACCUMULATE EMA]``.
Writes the final weights (and, with EMA, the EMA weights) and the per-step LR trace to OUT.
"""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import workbench as wb  # noqa: E402
from tests.helpers import TinyNet, toy_loader  # noqa: E402


class KillAfter(wb.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, logs):
        if trainer.epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def main(run_dir, out, epochs, freeze_epochs, kill_after, resume, accumulate=1, ema=None):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyNet(dropout=0.2)  # dropout: the RNG state must be restored too
    run = wb.Run(run_dir, resume=resume)
    callbacks = [KillAfter(kill_after)] if kill_after >= 0 else []
    history = wb.fit(
        model, toy_loader(shuffle=True), val_data=toy_loader(64, seed=1, shuffle=False), epochs=epochs,
        learning_rate=0.05, weight_decay=0.01, lr_scheduler_type="cosine", warmup_ratio=0.2,
        freeze_epochs=freeze_epochs, backbone_lr_ratio=0.5,
        grad_clip=1.0, callbacks=callbacks, run=run, resume=resume, progress=False, accumulate=accumulate, ema=ema,
    )
    wb.save_weights(model, Path(out) / "final.safetensors")
    if ema is not None:
        wb.save_weights(history.ema_weights, Path(out) / "ema.safetensors")
    (Path(out) / "lr_trace.json").write_text(json.dumps(history.lr_trace))


if __name__ == "__main__":
    a = sys.argv[1:]
    extra = (int(a[6]), float(a[7]) if a[7] != "none" else None) if len(a) > 6 else ()
    main(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), a[5] == "1", *extra)
