"""One rank of a LoRA fine-tuning under torchrun, launched by tests/test_lora.py (2 processes, gloo).

``torchrun --standalone --nproc_per_node 2 tests/lora_ddp_worker.py CSV RUN_DIR``

Rank 0 opens RUN_DIR; the other rank opens ``RUN_DIR-rank<r>``, a folder that a Run on that rank
never creates: any file found there afterwards was written by a rank other than 0.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.tasks import regulatory  # noqa: E402
from workbench.tracking import process_rank  # noqa: E402

TINY = {"width": 16, "layers": 1, "heads": 2, "fusion_hidden": 8, "condition_dim": 4}


def main(csv, run_dir):
    torch.set_num_threads(1)
    rank = process_rank()
    data = regulatory.load(csv, seed=0, label_fraction=0.5, val_fraction=0.25)
    torch.manual_seed(0)
    model = regulatory.build_model(data, **TINY)
    run = wb.Run(run_dir if rank == 0 else f"{run_dir}-rank{rank}", params={"case": "lora ddp"})
    wrapped, _ = regulatory.prepare(model, method="lora", rank=2, run=run)
    regulatory.finetune(wrapped, data, epochs=2, learning_rate=1e-2, batch_size=8, save_every=1, run=run,
                        progress=False)
    regulatory.evaluate(wrapped, data, run=run)


if __name__ == "__main__":
    main(*sys.argv[1:3])
