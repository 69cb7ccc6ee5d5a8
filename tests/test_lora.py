"""LoRA through peft: coverage report, adapters-only save and reload, merge."""

import json

import pytest
import torch
from torch import nn

from workbench import lora
from workbench.transfer import unwrap

pytest.importorskip("peft")


class Toy(nn.Module):
    """An encoder of linear layers and a norm, a condition embedding, a head."""

    lora_targets = ("encoder", "head")
    lora_train_fully = ("embedding",)

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(5, 4)
        self.stem = nn.Linear(6, 16)
        self.encoder = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 16))
        self.head = nn.Linear(20, 1)

    def forward(self, x, c):
        return self.head(torch.cat([self.encoder(self.stem(x)), self.embedding(c)], dim=1))


def toy(seed=0):
    torch.manual_seed(seed)
    return Toy()


def inputs():
    torch.manual_seed(1)
    return torch.randn(8, 6), torch.randint(0, 5, (8,))


def train_adapters(model):
    """Give the adapters non-zero values (peft starts lora_B at zero, which would make every check trivial)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


def test_coverage_report_names_matched_and_rejected_modules_and_the_trainable_fraction():
    wrapped, report = lora.apply_lora(toy(), rank=2)
    assert [m["module"] for m in report.matched] == ["encoder.0", "encoder.3", "head"]
    assert report.matched[0]["shape"] == "16 x 16" and report.matched[0]["lora_params"] == 2 * (16 + 16)
    reasons = {r["module"]: r["reason"] for r in report.rejected}
    assert "outside the LoRA targets" in reasons["stem"]
    assert "nn.Linear layers only" in reasons["encoder.1"]  # the LayerNorm
    assert "trained in full" in reasons["embedding"]
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert report.trainable == trainable == 2 * (32 + 32 + 21) + 20  # adapters + the embedding table
    assert report.total == sum(p.numel() for p in toy().parameters())
    assert report.fraction == pytest.approx(trainable / report.total)
    frame = report.to_frame()
    assert list(frame["status"]).count("adapted") == 3 and "LayerNorm" in set(frame["type"])
    assert json.loads(json.dumps(report.to_dict()))["fraction"] == pytest.approx(report.fraction)
    assert "<table" in report._repr_html_() and "3 layers adapted" in report._repr_html_()


def test_merged_model_equals_the_adapter_model():
    wrapped, _ = lora.apply_lora(toy(), rank=4)
    train_adapters(wrapped)
    x = inputs()
    wrapped.eval()
    with torch.no_grad():
        expected = wrapped(*x)
        merged = lora.merge(wrapped)
        assert type(merged) is Toy and not any("lora_" in n for n, _ in merged.named_parameters())
        assert torch.allclose(merged(*x), expected, atol=1e-5)
        assert not torch.allclose(toy()(*x), expected, atol=1e-3)  # the adapters changed something
        assert torch.equal(wrapped(*x), expected)  # merge worked on a copy


def test_adapters_saved_alone_reload_onto_the_base_model(tmp_path):
    base_state = toy().state_dict()
    wrapped, _ = lora.apply_lora(toy(), rank=2)
    train_adapters(wrapped)
    folder = lora.save_adapters(wrapped, tmp_path / "adapters")
    from safetensors.torch import load_file

    saved = load_file(folder / "adapter_model.safetensors")
    assert saved and all("lora_" in k or "embedding" in k for k in saved), sorted(saved)  # not the frozen base
    assert sum(t.numel() for t in saved.values()) == sum(t.numel() for t in lora.trainable_state(wrapped).values())
    fresh = Toy()
    fresh.load_state_dict(base_state)
    loaded = lora.load_adapters(fresh, folder)
    x = inputs()
    wrapped.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(*x), wrapped(*x), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_adapters(Toy(), tmp_path)


def test_adapters_saved_without_their_base_reload_onto_a_model_that_holds_it(tmp_path):
    wrapped, _ = lora.apply_lora(toy(), rank=2)
    train_adapters(wrapped)
    folder = lora.save_adapters(wrapped, tmp_path / "adapters", base=False)
    names = {p.name for p in folder.iterdir()}
    assert "adapter_model.safetensors" in names and lora.BASE_FILE not in names
    loaded = lora.load_adapters(toy(), folder)  # toy() holds the very base weights
    x = inputs()
    wrapped.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(*x), wrapped(*x), atol=1e-6)


def test_trainable_state_holds_adapters_and_fully_trained_parts_only():
    wrapped, report = lora.apply_lora(toy(), rank=2)
    state = lora.trainable_state(wrapped)
    assert sum(t.numel() for t in state.values()) == report.trainable
    assert all("lora_" in k or "embedding" in k for k in state)
    unwrap(wrapped).load_state_dict(state, strict=False)  # named as the user's module names them


def test_bad_arguments_say_what_is_accepted():
    with pytest.raises(ValueError, match="rank=0 must be a whole number >= 1"):
        lora.apply_lora(toy(), rank=0)
    with pytest.raises(ValueError, match=r"targets=\['decoder'\] match no nn.Linear.*\['embedding', 'stem'"):
        lora.apply_lora(toy(), targets=["decoder"])
    plain = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="declares no lora_targets"):
        lora.apply_lora(plain)
    with pytest.raises(TypeError, match="save_adapters needs the peft model"):
        lora.save_adapters(plain, "x")
    with pytest.raises(TypeError, match="merge needs a peft model"):
        lora.merge(plain)


def test_the_docstring_recipe_as_written_gives_the_fine_tuned_model(tmp_path):
    """``load_adapters(build_model(...), run.path / "adapters")``: a freshly built (random) model, no base loaded by
    hand; the folder carries the base weights (issue 23). Without them the outputs differed by up to 10."""
    wrapped, _ = lora.apply_lora(toy(seed=0), rank=2)
    train_adapters(wrapped)
    folder = lora.save_adapters(wrapped, tmp_path / "adapters")
    assert (folder / "base.safetensors").is_file()
    base = lora.base_state(wrapped)
    assert base.keys() == toy().state_dict().keys()
    again = lora.load_adapters(toy(seed=123), folder)  # another random initialisation, as build_model(...) gives
    x = inputs()
    wrapped.eval()
    with torch.no_grad():
        assert torch.equal(again(*x), wrapped(*x))
        assert torch.allclose(lora.merge(again)(*x), wrapped(*x), atol=1e-5)


def test_a_sigkilled_lora_run_resumes_bitwise_from_its_trainable_tensors(tmp_path):
    """Issue 21.15: LoRA checkpoints go through fit's own (last.pt holds the trainable tensors); a resume is exact."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from workbench.checkpoints import load_state, read_state_dict
    from workbench.tasks import regulatory

    worker = Path(__file__).with_name("lora_resume_worker.py")
    frame = regulatory.simulate(n_genes=24, n_regions=3, n_motifs=6, n_source_conditions=4, n_new_conditions=2)
    csv = regulatory.write_csv(frame, tmp_path / "tiny.csv")

    def work(run_dir, out, *, kill_after=-1, resume=False):
        (tmp_path / out).mkdir()
        args = [sys.executable, str(worker), str(csv), str(tmp_path / run_dir), str(tmp_path / out), str(kill_after),
                "1" if resume else "0"]
        return subprocess.run(args, capture_output=True, text=True, timeout=300)

    ref = work("ref_run", "ref")
    assert ref.returncode == 0, ref.stderr
    killed = work("run", "killed", kill_after=1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    saved = load_state(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["epoch"] == 1
    kept = set(saved["model"])  # the trainable tensors and the buffers, not the frozen base
    assert any(".lora_A." in k for k in kept) and "encoder.0.q.base_layer.weight" not in kept
    assert "region_embed.weight" not in kept and "conditions.numeric_mean" in kept
    assert kept == set(read_state_dict(tmp_path / "run" / "checkpoints" / "best.safetensors"))
    resumed = work("run", "resumed", resume=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((tmp_path / "resumed" / "trained.json").read_text()) == [2, 3]  # only what was left
    a = read_state_dict(tmp_path / "ref" / "final.safetensors")
    b = read_state_dict(tmp_path / "resumed" / "final.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ref_rows = [json.loads(line) for line in (tmp_path / "ref_run" / "metrics.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in rows] == [r["val_loss"] for r in ref_rows]



def test_under_torchrun_only_rank_0_writes_the_lora_checkpoints_and_predictions(tmp_path):
    """Issue 21.10: the LoRA checkpoint callback (and predictions.csv) wrote on every rank."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from workbench.tasks import regulatory

    frame = regulatory.simulate(n_genes=24, n_regions=3, n_motifs=6, n_source_conditions=4, n_new_conditions=2)
    csv = regulatory.write_csv(frame, tmp_path / "tiny.csv")
    worker = Path(__file__).with_name("lora_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORKBENCH_DDP_TIMEOUT_S": "60"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(csv), str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    checkpoints = {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()}
    assert {"base.safetensors", "best.safetensors", "epoch000.safetensors", "epoch001.safetensors", "last.pt"} <= checkpoints
    assert (tmp_path / "run" / "predictions.csv").exists()
    assert not (tmp_path / "run-rank1").exists()  # rank 1 wrote nothing


def test_on_a_rank_other_than_0_save_adapters_writes_nothing(tmp_path, monkeypatch):
    wrapped, _ = lora.apply_lora(toy(), rank=2)
    monkeypatch.setenv("RANK", "1")  # what torchrun sets on the second process
    assert lora.save_adapters(wrapped, tmp_path / "adapters") == tmp_path / "adapters"
    assert not (tmp_path / "adapters").exists()
