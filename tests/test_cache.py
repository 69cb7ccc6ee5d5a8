"""workbench.cache: fingerprinted entries, built once even when several processes ask at the same time."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from workbench.cache import cached, content_hash, fingerprint

ROOT = Path(__file__).resolve().parents[1]


def test_fingerprint_follows_content_not_identity():
    a = sp.random(50, 20, density=0.2, format="csr", random_state=0, dtype=np.float32)
    b = a.copy()
    assert content_hash(a) == content_hash(b)
    b.data[0] += 1.0
    assert content_hash(a) != content_hash(b)
    idx = np.arange(10)
    assert fingerprint(a, idx, {"lr": 1e-3, "epochs": 5}) == fingerprint(a.copy(), idx.copy(), {"epochs": 5, "lr": 1e-3})
    assert fingerprint(a, idx, {"lr": 1e-3}) != fingerprint(a, idx[:-1], {"lr": 1e-3})
    assert fingerprint(a, idx, {"lr": 1e-3}) != fingerprint(a, idx, {"lr": 2e-3})


def test_an_entry_is_built_once_and_reused(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder.name)
        (folder / "weights.bin").write_bytes(b"w")

    first = cached("pretrain", "k1", build, root=tmp_path, describe={"seed": 0})
    second = cached("pretrain", "k1", build, root=tmp_path)
    assert first == second == tmp_path / "pretrain" / "k1" and calls == ["k1.partial"]
    assert (first / "weights.bin").read_bytes() == b"w" and (first / "fingerprint.json").is_file()
    assert not (tmp_path / "pretrain" / "k1.partial").exists()


def test_two_processes_asking_at_once_build_once(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from workbench.cache import cached

        def build(folder):
            with open(Path({str(tmp_path)!r}) / "builds.log", "a") as log:
                log.write("built\\n")
            time.sleep(1.5)
            (folder / "w").write_text("x")

        print(cached("pretrain", "same", build, root={str(tmp_path / 'cache')!r}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] == str(tmp_path / "cache" / "pretrain" / "same")
    assert (tmp_path / "builds.log").read_text() == "built\n"


def test_code_version_follows_the_source_file(tmp_path, monkeypatch):
    from workbench.cache import code_version

    module = tmp_path / "pretrain_code.py"
    module.write_text("OBJECTIVE = 'masked'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = code_version("pretrain_code")
    module.write_text("OBJECTIVE = 'contrastive'\n")
    assert code_version("pretrain_code") != first and "torch" in first


def test_code_version_of_a_package_follows_every_module_in_it(tmp_path, monkeypatch):
    """Issue 22: a task split into a package; its key named the package, whose __init__.py is one file of many."""
    from workbench.cache import code_version

    package = tmp_path / "split_task"
    package.mkdir()
    (package / "__init__.py").write_text("from .steps import OBJECTIVE\n")
    (package / "steps.py").write_text("OBJECTIVE = 'masked'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = code_version("split_task")
    (package / "steps.py").write_text("OBJECTIVE = 'contrastive'\n")
    assert code_version("split_task") != first


def test_arrays_nested_in_containers_are_hashed_by_content_and_numpy_scalars_keep_their_type():
    """Issue 21.8: numpy's str elides arrays over 1,000 elements, and json's default=str made np.int64(1) "1"."""
    a = np.arange(2000)
    b = a.copy()
    b[500] = -1  # str(a) == str(b): only the ends are printed
    assert fingerprint({"train_idx": a}) != fingerprint({"train_idx": b})
    assert fingerprint([a, 1]) != fingerprint([b, 1])
    assert fingerprint({"idx": (a,)}) != fingerprint({"idx": (b,)})
    assert fingerprint({"idx": a}) == fingerprint({"idx": a.copy()})  # content, not identity
    assert fingerprint({"idx": a}) != fingerprint({"idx": a.astype(np.int32)})  # dtype counts
    assert fingerprint({"idx": a}) != fingerprint({"idx": a.reshape(2, 1000)})  # shape counts
    assert fingerprint({"n": np.int64(1)}) != fingerprint({"n": "1"})
    assert fingerprint([np.int64(1)]) != fingerprint(["1"])
    assert fingerprint({"n": np.int64(1)}) != fingerprint({"n": np.int32(1)})
    assert fingerprint({"n": np.int64(1)}) == fingerprint({"n": np.int64(1)})
    sparse = sp.random(50, 20, density=0.2, format="csr", random_state=0, dtype=np.float32)
    changed = sparse.copy()
    changed.data[0] += 1.0
    assert fingerprint({"x": sparse}) != fingerprint({"x": changed})
    names = np.array(["a", "b", None], dtype=object)  # objects by value, not by address
    assert fingerprint({"names": names}) == fingerprint({"names": names.copy()})


def test_code_version_follows_the_workbench_core(tmp_path, monkeypatch):
    """Issue 21.2: a fix in training.py (or any core module a build runs) must rebuild cached entries."""
    import shutil

    from workbench import cache

    copy = tmp_path / "workbench"
    shutil.copytree(ROOT / "workbench", copy, ignore=shutil.ignore_patterns("__pycache__", "tasks"))
    monkeypatch.setattr(cache, "__file__", str(copy / "cache.py"))  # the core that code_version reads
    first = cache.code_version("workbench.tasks.cell_type")
    assert cache.code_version("workbench.tasks.cell_type") == first
    with open(copy / "training.py", "a") as fh:
        fh.write("\n# a fix in the training loop\n")
    assert cache.code_version("workbench.tasks.cell_type") != first


def test_a_build_leaves_the_callers_random_states_as_they_were(tmp_path):
    """Issue 21.2: what a run draws after cached() must not depend on whether the entry was built or found."""
    import random

    import torch

    def build(folder):
        torch.manual_seed(123)
        np.random.seed(123)
        random.seed(123)
        (folder / "w").write_text(str(torch.rand(3).tolist()))

    def draws():
        return torch.rand(2).tolist(), np.random.rand(2).tolist(), random.random()

    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    cached("pretrain", "k", build, root=tmp_path)  # built now
    built = draws()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    cached("pretrain", "k", build, root=tmp_path)  # found
    assert draws() == built
