"""One rank of the DDP validation checks in tests/test_distributed.py (issue 21: items 1, 5 and 12).

``torchrun --standalone --nproc_per_node 2 tests/ddp_eval_worker.py OUT``

Three fits, each written to ``OUT/<case>_rank<r>.json`` (the logged rows and what the test compares):

* ``macro_f1``: validation is a DataLoader of 9 samples (split 5 + 4 over the ranks); ``evaluate``
  returns :class:`workbench.training.PerSample`; rank 0 also scores the whole set in one process.
* ``batchnorm``: a BatchNorm model, each rank trained on its own data (PerRank), so each rank's
  running statistics differ; rank 0 recomputes the validation loss of its own final model.
* ``restore_best``: no run folder, a monitor that peaks at epoch 1 of 3; every rank saves the
  weights it had after each epoch and the weights fit returned.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from torch import nn  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.distributed import PerRank, context  # noqa: E402
from workbench.metrics import classification_metrics  # noqa: E402
from workbench.training import PerSample  # noqa: E402

from tests.ddp_worker import PlainNet, dataset  # noqa: E402
from tests.helpers import TinyNet  # noqa: E402


def macro_f1(*, truth, pred) -> dict:
    return {"val_macro_f1": classification_metrics(truth, pred, labels=[0, 1, 2])["macro_f1"]}


def predictions(model, batches) -> PerSample:
    pred, truth = zip(*[(model(x).argmax(1), y) for x, y in batches])
    return PerSample(macro_f1, truth=torch.cat(truth), pred=torch.cat(pred))


def case_macro_f1(ctx, out: Path) -> None:
    torch.manual_seed(0)
    model = PlainNet()
    val_set = dataset(9, seed=2)
    val = torch.utils.data.DataLoader(val_set, batch_size=4)
    train = torch.utils.data.DataLoader(dataset(64), batch_size=8, shuffle=True)
    history = wb.fit(model, train, val_data=val, evaluate=predictions, epochs=1, learning_rate=0.0, seed=0,
                     progress=False)
    record = {"rows": history.rows}
    if ctx.is_main:  # the same model, the whole validation set, in this process alone
        with torch.no_grad():
            model.eval()
            record["whole_set"] = predictions(model, [val_set.tensors]).scored()
    (out / f"macro_f1_rank{ctx.rank}.json").write_text(json.dumps(record))


def case_batchnorm(ctx, out: Path) -> None:
    g = torch.Generator().manual_seed(10 + ctx.rank)
    shift = 3.0 * ctx.rank  # each rank's data has its own mean: its running statistics drift apart
    train = [(torch.randn(16, 10, generator=g) + shift, torch.randint(0, 3, (16,), generator=g)) for _ in range(4)]
    gv = torch.Generator().manual_seed(99)
    val = [(torch.randn(20, 10, generator=gv) + 1.5, torch.randint(0, 3, (20,), generator=gv)) for _ in range(2)]
    torch.manual_seed(0)
    model = TinyNet()
    history = wb.fit(model, PerRank(train), val_data=val, epochs=2, learning_rate=0.01, seed=0, progress=False)
    record = {"rows": history.rows, "state": {k: v.tolist() for k, v in model.state_dict().items()}}
    if ctx.is_main:
        model.eval()
        with torch.no_grad():
            total = sum(nn.functional.cross_entropy(model(x), y, reduction="sum") for x, y in val)
        record["rank0_val_loss"] = float(total) / 40
    (out / f"batchnorm_rank{ctx.rank}.json").write_text(json.dumps(record))


class Snapshots(wb.Callback):
    def __init__(self):
        self.states = []

    def on_epoch_end(self, trainer, logs):
        self.states.append({k: v.tolist() for k, v in trainer.model.state_dict().items()})


def case_restore_best(ctx, out: Path) -> None:
    scores = iter([0.5, 0.9, 0.6])
    torch.manual_seed(0)
    model = PlainNet()
    snapshots = Snapshots()
    train = torch.utils.data.DataLoader(dataset(64), batch_size=8, shuffle=True)
    history = wb.fit(model, train, evaluate=lambda m, d: {"val_score": next(scores)}, monitor="val_score",
                     mode="max", epochs=3, learning_rate=0.05, restore_best=True, callbacks=[snapshots], seed=0,
                     progress=False)
    record = {"best_epoch": history.best_epoch, "epochs": snapshots.states,
              "final": {k: v.tolist() for k, v in model.state_dict().items()}}
    (out / f"restore_best_rank{ctx.rank}.json").write_text(json.dumps(record))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    ctx = context(True)
    case_macro_f1(ctx, args.out)
    case_batchnorm(ctx, args.out)
    case_restore_best(ctx, args.out)


if __name__ == "__main__":
    main()
