"""Device discipline, testable without a GPU: the one device path, the float64 proxy, resume state, GPU assignment.

The proxy: every workflow's notebook runs with ``dtype="float64"``. The model is cast to float64 and
every batch that takes the device path (:func:`workbench.devices.to_device`) with it; a batch that
skips it reaches the model as float32 and the model raises, where on a GPU a CPU tensor would meet a
CUDA model.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import workbench as wb
from workbench import devices
from workbench.checkpoints import load_state, save_state
from workbench.execute import run_in_process

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


# --------------------------------------------------------------------------- the one device path


def test_to_device_casts_floating_tensors_only_and_keeps_structure():
    from collections import namedtuple

    Pair = namedtuple("Pair", "x y")
    batch = {"a": (torch.ones(2, dtype=torch.float32), torch.arange(2)), "b": [Pair(torch.zeros(1), 3)], "c": "text"}
    moved = devices.to_device(batch, "cpu", torch.float64)
    assert moved["a"][0].dtype == torch.float64 and moved["a"][1].dtype == torch.int64
    assert isinstance(moved["b"][0], Pair) and moved["b"][0].x.dtype == torch.float64 and moved["b"][0].y == 3
    assert moved["c"] == "text"
    same = torch.ones(3)
    assert devices.to_device(same, "cpu") is same  # already in place: no copy


def test_to_model_follows_the_model_and_to_numpy_returns_host_float32():
    model = nn.Linear(3, 2).double()
    assert devices.placement(model) == (torch.device("cpu"), torch.float64)
    x = devices.to_model(torch.ones(4, 3), model)
    assert x.dtype == torch.float64 and model(x).shape == (4, 2)
    out = devices.to_numpy(torch.ones(2, dtype=torch.bfloat16, requires_grad=True) * 2)
    assert out.dtype == np.float32 and out.tolist() == [2.0, 2.0]


def test_padded_batches_are_moved_and_cast_through_their_payload():
    from ptls.data_load.padded_batch import PaddedBatch

    batch = PaddedBatch({"amount": torch.ones(2, 3), "event_type": torch.ones(2, 3, dtype=torch.long)},
                        torch.tensor([3, 2]))
    moved = devices.to_device(batch, "cpu", torch.float64)
    assert isinstance(moved, PaddedBatch) and moved.payload["amount"].dtype == torch.float64
    assert moved.payload["event_type"].dtype == torch.long and moved.seq_lens.tolist() == [3, 2]


def test_device_names_are_resolved_and_checked_without_cuda(monkeypatch):
    monkeypatch.delenv(devices.BACKEND_VAR, raising=False)
    assert devices.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert devices.resolve_device("auto") == torch.device("cpu") == devices.resolve_device(None)
        with pytest.raises(ValueError, match="CUDA is not available here.*device='auto'"):
            devices.resolve_device("cuda:1")
    with pytest.raises(ValueError, match="not a device"):
        devices.resolve_device("gpu")
    with pytest.raises(ValueError, match="float32, float64"):
        devices.resolve_dtype("double")
    check = devices.DeviceName()
    assert check.problem("device", "cuda:3") is None and check.problem("device", "auto") is None
    assert "cuda:N" in check.problem("device", "gpu0")
    monkeypatch.setenv(devices.BACKEND_VAR, "gloo")  # `workbench run --backend gloo`: CPU processes
    assert devices.resolve_device("auto") == torch.device("cpu")


def test_fit_casts_the_model_and_every_batch_it_moves_and_hands_evaluate_moved_batches():
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    data = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    model = nn.Linear(4, 2)
    seen = []

    def loss_fn(m, batch):
        seen.append(batch[0].dtype)
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    def evaluate(m, batches):
        dtypes = {b[0].dtype for b in batches}
        return {"val_float64": float(dtypes == {torch.float64}), "n_batches": len(batches)}

    history = wb.fit(model, data, val_data=data, loss_fn=loss_fn, evaluate=evaluate, epochs=1, learning_rate=0.1,
                     dtype="float64", accumulate=2, progress=False)
    assert model.weight.dtype == torch.float64 and set(seen) == {torch.float64}
    assert history.rows[0]["val_float64"] == 1.0 and history.rows[0]["n_batches"] == 4


def test_dtype_is_a_setting_a_resume_must_match(tmp_path):
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    run = wb.Run(tmp_path / "r", params={})
    wb.fit(nn.Linear(4, 2), data, loss_fn=loss_fn, epochs=1, learning_rate=0.1, run=run, progress=False,
           dtype="float64")
    with pytest.raises(ValueError, match="dtype: 'float64' saved, None now"):
        wb.fit(nn.Linear(4, 2), data, loss_fn=loss_fn, epochs=1, learning_rate=0.1, progress=False,
               run=wb.Run(tmp_path / "r", params={}, resume=True), resume=True)


# --------------------------------------------------------------------------- the float64 proxy, every workflow

#: Each workflow's tiny notebook run and its small inputs: the same as `make gpu-check` runs on a GPU.
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_check import WORKFLOWS as PROXY_RUNS, workflow_inputs  # noqa: E402


@pytest.fixture(scope="module")
def proxy_data(tmp_path_factory):
    return workflow_inputs(tmp_path_factory.mktemp("proxy_data"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROXY_RUNS))
def test_every_workflow_runs_in_float64_so_every_tensor_takes_the_device_path(name, proxy_data, tmp_path, monkeypatch):
    """Issue 27: a batch that skips workbench.devices meets the float64 model as float32 and raises."""
    monkeypatch.setenv("TORCH_NUM_THREADS", "1")
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))  # the pretraining is built here, in float64
    params = {**PROXY_RUNS[name], **proxy_data.get(name, {}), "device": "cpu", "dtype": "float64",
              "output_dir": str(tmp_path / "run")}
    namespace = run_in_process(NOTEBOOKS / f"{name}.ipynb", parameters=params)
    if name != "spatial_transfer":  # spatial: cross_validate trains a fresh model per fold; `model` is the report's
        assert all(p.dtype == torch.float64 for p in namespace["model"].parameters() if p.is_floating_point())
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final and all(np.isfinite(v) for v in final.values() if isinstance(v, float))


# --------------------------------------------------------------------------- random numbers on the batch's device


def test_augment_views_draws_its_random_numbers_on_the_batch_device():
    """The meta device stands in for a GPU: a CPU tensor meeting the batch raises (it did: heart-sound pretraining)."""
    from workbench import audio

    x = torch.randn(4, 800, device="meta")
    out = audio.augment_views(x, rate=4000)
    assert out.device.type == "meta" and out.shape == (4, 800)
    cpu = audio.augment_views(torch.randn(4, 800, dtype=torch.float64), rate=4000, generator=torch.Generator().manual_seed(0))
    assert cpu.dtype == torch.float64


def test_the_spatial_loss_over_masked_spots_equals_the_indexed_mean_without_a_host_sync():
    from workbench.tasks import spatial_transfer as st

    torch.manual_seed(0)
    model = st.SpatialExpressionModel(5, 3, layers=1, hidden=8, gat_heads=2, d_model=8, heads=2, ff=16)
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    edges = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]])
    mask = torch.tensor([True, False, True, True, False, True])
    model.eval()
    expected = nn.functional.mse_loss(model(x, edges)[mask], y[mask])
    assert torch.allclose(model.loss((x, edges, y, mask)), expected, rtol=1e-6)


# --------------------------------------------------------------------------- resume state


def _trainer():
    from workbench.schedules import build_scheduler
    from workbench.training import History, Trainer

    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Trainer(model, opt, build_scheduler(opt, "constant", total_steps=10), History(), device=torch.device("cpu"),
                   run=None, quiet=True)


def test_grad_scaler_state_goes_into_last_pt_and_comes_back(tmp_path):
    """Issue 27: an fp16 resume restarted the loss scale at 65536; the scaler's state now travels in last.pt."""
    trainer = _trainer()
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    for _ in range(3):  # each finite step doubles the scale (growth_interval=1)
        trainer.optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(trainer.model(x).float(), y)
        trainer.scaler.scale(loss).backward()
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
    assert trainer.scaler.get_scale() == 2.0 ** 13
    save_state(trainer.state_dict(None), tmp_path / "last.pt")

    resumed = _trainer()
    resumed.scaler = torch.amp.GradScaler("cpu", growth_interval=1)  # a fresh one starts at 65536
    resumed.load_state_dict(load_state(tmp_path / "last.pt"), None)
    assert resumed.scaler.state_dict() == trainer.scaler.state_dict()


def test_cuda_rng_states_are_restored_for_the_gpus_present():
    states = [torch.full((8,), i, dtype=torch.uint8) for i in range(3)]
    kept, note = devices.cuda_rng_states_for(states, 1)  # saved on 3 GPUs, resumed on 1
    assert len(kept) == 1 and torch.equal(kept[0], states[0])
    assert "3 GPUs, 1 are visible now" in note and "dropped" in note
    kept, note = devices.cuda_rng_states_for(states[:1], 2)
    assert len(kept) == 1 and "keep their own seeds" in note
    kept, note = devices.cuda_rng_states_for(states, 3)
    assert len(kept) == 3 and note == ""


# --------------------------------------------------------------------------- processes and GPUs


def test_sweep_workers_get_the_visible_gpus_round_robin():
    assert devices.worker_gpus(3, ["0", "1"]) == ["0", "1", "0"]
    assert devices.worker_gpus(2, []) == [None, None]
    assert devices.visible_gpus({"CUDA_VISIBLE_DEVICES": "3, 5"}) == ["3", "5"]
    assert devices.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


@pytest.mark.slow
def test_each_sweep_worker_runs_its_kernels_on_its_own_gpu(tmp_path, monkeypatch):
    """CUDA_VISIBLE_DEVICES faked: 2 workers, 2 runs at once; each kernel sees one GPU, and not the same one."""
    import yaml

    from workbench.sweeps import run_sweep

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "gpus", "notebook": str(ROOT / "tests" / "notebooks" / "tiny.ipynb"),
                                    "output_root": str(tmp_path / "out"), "parameters": {"sleep_s": 3.0},
                                    "grid": {"seed": [0, 1]}}))
    result = run_sweep(spec, workers=2, progress=False)
    assert result.n_failed == 0
    seen = sorted(json.loads(p.read_text())["CUDA_VISIBLE_DEVICES"] for p in (tmp_path / "out" / "gpus").glob("*/env.json"))
    assert seen == ["3", "5"]


def test_nproc_above_the_gpus_is_refused_and_gloo_is_chosen_on_request():
    from workbench.distributed import choose_backend
    from workbench.launch import backend_environment

    with pytest.raises(ValueError, match="--nproc 3 with nccl needs 3 GPUs.*2 are visible.*--backend gloo"):
        backend_environment(3, "auto", gpus=2, environ={})
    assert backend_environment(2, "auto", gpus=2, environ={})[devices.BACKEND_VAR] == "nccl"
    assert backend_environment(4, "gloo", gpus=1, environ={})[devices.BACKEND_VAR] == "gloo"
    assert backend_environment(2, "auto", gpus=0, environ={})[devices.BACKEND_VAR] == "gloo"
    assert choose_backend({devices.BACKEND_VAR: "gloo"}) == "gloo"
    with pytest.raises(ValueError, match="not one of nccl, gloo"):
        choose_backend({devices.BACKEND_VAR: "mpi"})


def test_a_ddp_rank_trains_on_its_own_device_whatever_cuda_index_was_asked(monkeypatch):
    from workbench.distributed import DistContext

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv(devices.BACKEND_VAR, raising=False)
    assert DistContext(enabled=True, rank=1, world_size=2, local_rank=1).device("cpu") == torch.device("cpu")
    if torch.cuda.device_count() >= 2:
        assert devices.resolve_device("cuda:0") == torch.device("cuda", 1)
    elif not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            DistContext(enabled=True, rank=1, world_size=2, local_rank=1).device("cuda:0")


def test_deterministic_fit_sets_torch_flags_and_the_cublas_workspace(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
        wb.fit(nn.Linear(4, 2), data, loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), epochs=1,
               learning_rate=0.1, deterministic=True, progress=False)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.deterministic = False


# --------------------------------------------------------------------------- make gpu-check


def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert "gpu_check: no CUDA device here" in done.stdout and not out.exists()
    assert "gpu-check:" in (ROOT / "Makefile").read_text()


# --------------------------------------------------------------------------- batches built ahead


def test_prefetch_yields_the_same_batches_in_order_and_leaves_the_generator_as_a_plain_pass():
    from workbench.batches import Prefetch, TensorBatches

    def batches():
        return TensorBatches((torch.arange(50.0), torch.arange(50)), batch_size=8, shuffle=True, seed=3)

    plain, ahead = batches(), Prefetch(batches(), depth=2, pin_memory=True)
    for _ in range(2):  # two epochs: a new permutation each
        assert [b[0].tolist() for b in ahead] == [b[0].tolist() for b in plain]
    assert torch.equal(ahead.generator.get_state(), plain.generator.get_state()) and len(ahead) == len(plain) == 7
    first = next(iter(ahead))  # a loop that stops early ends the thread (no hang)
    assert len(first[0]) == 8

    class Broken:
        def __len__(self):
            return 3

        def __iter__(self):
            yield torch.zeros(2)
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(Prefetch(Broken()))


def test_fit_with_prefetch_trains_exactly_as_without(tmp_path):
    from workbench.batches import TensorBatches

    x, y = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 2
    histories = []
    for prefetch in (0, 3):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2))
        history = wb.fit(model, TensorBatches((x, y), batch_size=8, shuffle=True, seed=1), epochs=2,
                         learning_rate=0.05, seed=0,
                         loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), prefetch=prefetch,
                         progress=False)
        histories.append(([r["train_loss"] for r in history.rows], [p.detach().clone() for p in model.parameters()]))
    assert histories[0][0] == histories[1][0]
    assert all(torch.equal(a, b) for a, b in zip(histories[0][1], histories[1][1]))


def test_workbench_run_refuses_nccl_without_enough_gpus_before_any_work(tmp_path, capsys):
    from workbench.cli import main

    code = main(["run", str(NOTEBOOKS / "cell_type_annotation.ipynb"), "--nproc", str(max(2, torch.cuda.device_count() + 1)),
                 "--backend", "nccl", "-o", str(tmp_path / "run")])
    assert code == 2 and "with nccl needs" in capsys.readouterr().err and not (tmp_path / "run").exists()
