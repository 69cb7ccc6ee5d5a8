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
