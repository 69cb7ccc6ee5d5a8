"""workbench.streaming: batches streamed from a backed .h5ad (files the tests write), and the cell-type data path on it."""

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import workbench as wb
from workbench.streaming import StreamingBatches, read_rows, scan
from workbench.tasks import cell_type

from .helpers import TinyNet


def write_atlas(path, *, n_cells=600, n_genes=30, density=0.2, seed=0, csc=False):
    """A small sparse .h5ad written by anndata itself (CSR unless ``csc``), labels in obs['cell_type']."""
    import anndata
    import pandas as pd

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n_cells)
    X = sp.random(n_cells, n_genes, density=density, format="csr", dtype=np.float32, random_state=seed)
    X = X + sp.csr_matrix((np.ones(n_cells, dtype=np.float32), (np.arange(n_cells), labels)), shape=X.shape)
    X = X.tocsc() if csc else X.tocsr()
    obs = pd.DataFrame({"cell_type": pd.Categorical([f"t{k}" for k in labels])},
                       index=[f"c{i}" for i in range(n_cells)])
    anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])).write_h5ad(path)
    return path


@pytest.fixture
def atlas(tmp_path):
    return write_atlas(tmp_path / "atlas.h5ad")


class Recording:
    """A matrix that records how many rows each read asked for (and refuses to be read whole)."""

    def __init__(self, matrix):
        self.matrix, self.shape, self.reads = matrix, matrix.shape, []

    def __getitem__(self, idx):
        idx = np.asarray(idx)
        assert idx.dtype != bool and idx.ndim == 1, "only row index arrays"
        self.reads.append(len(idx))
        return self.matrix[idx]


def epoch_cells(batches):
    return np.concatenate([x.numpy()[:, -1] for x, *_ in batches]).astype(int)


def with_row_ids(X):
    """X with its row number in an extra last column, so a batch tells which cells it holds."""
    return sp.hstack([X, sp.csr_matrix(np.arange(X.shape[0], dtype=np.float32)[:, None])]).tocsr()


def test_backed_batches_hold_every_cell_once_with_its_label_and_never_read_x_whole(atlas):
    import anndata

    backed = anndata.read_h5ad(atlas, backed="r")
    memory = anndata.read_h5ad(atlas).X
    labels = backed.obs["cell_type"].cat.codes.to_numpy()
    assert getattr(backed.X, "format", None) == "csr" and not sp.issparse(backed.X)  # on disk
    idx = np.arange(0, 600, 2)
    batches = StreamingBatches(backed.X, idx, labels=labels, batch_size=32, shuffle=True, seed=0, block_size=8,
                               fetch_factor=2)
    xs, ys = zip(*batches)
    assert len(batches) == len(xs) == 10 and all(x.dtype == torch.float32 for x in xs)
    got = torch.cat(xs).numpy()
    # the same rows as in memory, each cell once, each with its own label, in a shuffled order
    order = batches.epoch_order()  # the next epoch's order: no expression read
    assert sorted(order) != list(order) and sorted(order) == list(idx)
    recorded = Recording(sp.csr_matrix(memory))
    again = StreamingBatches(with_row_ids(recorded.matrix), idx, labels=labels, batch_size=32, shuffle=True, seed=0,
                             block_size=8, fetch_factor=2)
    cells = epoch_cells(again)
    assert sorted(cells) == list(idx) and np.array_equal(got, memory[cells].toarray())
    assert np.array_equal(torch.cat(ys).numpy(), labels[cells])
    # a fetch of 2 batches is 8 blocks of 8 consecutive cells (of idx; one may be the short last block), shuffled
    fetch = np.sort(cells[:64]) // 2
    assert sorted(cells[:64]) != list(cells[:64]) and np.sum(np.diff(fetch) != 1) + 1 <= 9

    # no read asks for more than one fetch (batch_size * fetch_factor rows)
    loader = StreamingBatches(recorded, idx, labels=labels, batch_size=32, shuffle=True, seed=0, fetch_factor=2)
    assert sum(len(y) for _, y in loader) == len(idx)
    assert max(recorded.reads) <= 64 and sum(recorded.reads) == len(idx)


def test_the_order_is_seeded_changes_per_epoch_and_resumes_from_the_generator_state():
    X = with_row_ids(sp.random(500, 5, density=0.3, format="csr", dtype=np.float32, random_state=1))
    a = StreamingBatches(X, batch_size=20, shuffle=True, seed=3, block_size=4, fetch_factor=5)
    first, second = epoch_cells(a), epoch_cells(a)
    assert not np.array_equal(first, second) and sorted(first) == sorted(second) == list(range(500))
    b = StreamingBatches(X, batch_size=20, shuffle=True, seed=3, block_size=4, fetch_factor=5)
    assert np.array_equal(epoch_cells(b), first)
    state = b.generator.get_state()  # what wb.fit saves in last.pt after an epoch
    c = StreamingBatches(X, batch_size=20, shuffle=True, seed=99, block_size=4, fetch_factor=5)
    c.generator.set_state(state)
    assert np.array_equal(epoch_cells(c), second)
    assert not np.array_equal(epoch_cells(StreamingBatches(X, batch_size=20, shuffle=True, seed=4)), first)
    # unshuffled: sorted order, every time
    plain = StreamingBatches(X, [9, 3, 7], batch_size=2)
    assert list(epoch_cells(plain)) == [3, 7, 9] == list(plain.epoch_order())


def test_fit_resumed_after_a_kill_sees_the_same_batches_as_an_uninterrupted_run(tmp_path):
    X = sp.random(256, 10, density=0.5, format="csr", dtype=np.float32, random_state=0)
    y = (np.asarray(X[:, 0].todense()).ravel() > 0.5).astype(int)

    def loader():
        return StreamingBatches(X, labels=y, batch_size=32, shuffle=True, seed=0, block_size=8, fetch_factor=2)

    class StopAfter(wb.Callback):
        def on_epoch_end(self, trainer, logs):
            if trainer.epoch == 1:
                raise KeyboardInterrupt

    kwargs = dict(epochs=4, learning_rate=0.05, lr_scheduler_type="cosine", progress=False)
    torch.manual_seed(0)
    reference = TinyNet()
    wb.fit(reference, loader(), run=wb.Run(tmp_path / "ref"), **kwargs)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        wb.fit(TinyNet(), loader(), run=wb.Run(tmp_path / "run"), callbacks=[StopAfter()], **kwargs)
    resumed = TinyNet()
    wb.fit(resumed, loader(), run=wb.Run(tmp_path / "run", resume=True), resume=True, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()))


def test_scan_hashes_backed_in_memory_and_dense_alike_and_counts_nan(atlas, tmp_path):
    import anndata

    backed = anndata.read_h5ad(atlas, backed="r")
    memory = anndata.read_h5ad(atlas).X
    found = scan(backed.X, chunk_rows=64)
    assert found.n_nonfinite == 0
    assert found.content_hash == scan(memory).content_hash == scan(memory.toarray(), chunk_rows=7).content_hash
    changed = memory.copy()
    changed.data[5] += 1
    assert scan(changed).content_hash != found.content_hash
    changed.data[:3] = [np.nan, np.inf, -np.inf]
    assert scan(changed).n_nonfinite == 3
    # a dense HDF5 dataset is read run by run, rows in the order asked
    with h5py.File(tmp_path / "dense.h5", "w") as f:
        f["X"] = memory.toarray()
    with h5py.File(tmp_path / "dense.h5", "r") as f:
        rows = read_rows(f["X"], np.array([0, 1, 2, 10, 11, 599]))
        assert np.array_equal(rows, memory[[0, 1, 2, 10, 11, 599]].toarray())
        assert scan(f["X"]).content_hash == found.content_hash


def test_cell_type_load_backed_true_false_and_auto_take_one_path_with_equal_results(atlas, monkeypatch):
    backed = cell_type.load(str(atlas), "cell_type", backed="true", seed=0)
    memory = cell_type.load(str(atlas), "cell_type", backed="false", seed=0)
    assert backed.backed and not memory.backed and sp.issparse(memory.X) and not sp.issparse(backed.X)
    assert "streamed from the file" in backed.summary() and backed.to_dict()["backed"] is True
    # splits from obs alone: the same cells either way; the same hash, so a pretrained encoder is shared
    for name in ("train_idx", "test_idx", "labelled_idx", "val_idx"):
        assert np.array_equal(getattr(backed, name), getattr(memory, name))
    assert backed.content_hash == memory.content_hash
    a = backed.batches(backed.labelled_idx, batch_size=16, shuffle=True, seed=1)
    b = memory.batches(memory.labelled_idx, batch_size=16, shuffle=True, seed=1)
    assert type(a) is type(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    test = backed.test_idx[::-1]  # any order: probabilities come back in the order asked
    assert np.array_equal(backed.dense(test), memory.X[test].toarray())
    model = cell_type.build_model(backed, hidden=(8,))
    proba = cell_type.predict_proba(model, backed, test)
    assert np.allclose(proba, cell_type.predict_proba(model, memory, test), atol=1e-6)
    model.eval()
    with torch.no_grad():
        first = torch.softmax(model(torch.from_numpy(memory.X[test[:1]].toarray())), 1).numpy()
    assert np.allclose(proba[:1], first, atol=1e-6)
    # the baseline: the same on both, and a row cap that is honoured
    full = cell_type.baseline(backed)  # test-cell probabilities, columns in backed.classes order
    assert full.shape == (len(backed.test_idx), len(backed.classes))
    np.testing.assert_array_equal(full, cell_type.baseline(memory))
    assert len(cell_type.baseline_cells(backed, max_cells=30)) == 30
    capped = cell_type.baseline(backed, max_cells=30)
    assert not np.array_equal(capped, full) and np.allclose(capped.sum(1), 1)
    # auto: backed only above the size threshold
    assert not cell_type.load(str(atlas), "cell_type", backed="auto").backed
    monkeypatch.setattr(cell_type.data, "BACKED_AUTO_BYTES", 1000)  # read where use_backed reads it
    assert cell_type.load(str(atlas), "cell_type", backed="auto").backed
    with pytest.raises(ValueError, match="backed='yes' is not one of auto, true, false"):
        cell_type.load(str(atlas), "cell_type", backed="yes")


def test_the_bundled_demo_loads_backed_too():
    data = cell_type.load("", "bulk_labels", backed="true")
    demo = cell_type.load("", "bulk_labels")
    assert data.backed and not demo.backed and data.features == "adata.raw.X"
    assert data.content_hash == demo.content_hash
    assert np.array_equal(data.dense(data.test_idx[:5]), demo.dense(demo.test_idx[:5]))


def test_a_csc_file_is_refused_when_backed_with_the_fix(tmp_path):
    path = write_atlas(tmp_path / "csc.h5ad", csc=True)
    with pytest.raises(ValueError, match=r"CSC.*tocsr\(\).*backed='false'"):
        cell_type.load(str(path), "cell_type", backed="true")
    assert cell_type.load(str(path), "cell_type", backed="false").X.shape == (600, 30)
