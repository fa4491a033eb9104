"""The on-disk feature store: rows round-trip exactly whatever the batch order,
and the file is never mapped, so replaying it does not grow resident memory."""
import sys
from pathlib import Path

import pytest
import torch

from clipft.engine.cache.store import STATUS_OK, IndexStore


def fill(directory, n, shape, dtype, batch=7, order=None):
    store = IndexStore(n, directory, key_parts={"k": 1})
    rows = torch.randn(n, *shape).to(dtype)
    order = torch.arange(n) if order is None else order
    for chunk in order.split(batch):
        store.put(chunk, rows[chunk], [f"c{i}" for i in chunk.tolist()], chunk % 3)
    store.finish()
    return store, rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5,), (3, 4)])
def test_rows_round_trip_in_any_order(tmp_path, dtype, shape):
    g = torch.Generator().manual_seed(0)
    n = 50
    store, rows = fill(tmp_path / "s", n, shape, dtype, order=torch.randperm(n, generator=g))
    assert store.nbytes == n * rows[0].numel() * rows.element_size()
    assert (tmp_path / "s" / "values.bin").stat().st_size == store.nbytes
    for index in (torch.arange(n), torch.randperm(n, generator=g)[:13], torch.tensor([4, 5, 6, 40, 2]),
                  torch.tensor([], dtype=torch.long)):
        values, captions, labels, kept = store.gather(index)
        assert torch.equal(values, rows[index]) and values.dtype == dtype
        assert captions == [f"c{i}" for i in index.tolist()] and torch.equal(labels, index % 3)
    reopened, why = IndexStore.open(tmp_path / "s", n, {"k": 1})
    assert why is None and reopened.loaded
    assert torch.equal(reopened.gather(torch.arange(n))[0], rows)


def test_samples_never_stored_are_left_out(tmp_path):
    store = IndexStore(6, tmp_path / "s", key_parts={})
    store.put(torch.tensor([0, 1, 3, 4, 5]), torch.ones(5, 2), ["a"] * 5, torch.zeros(5, dtype=torch.long))
    store.finish()
    assert (store.status == STATUS_OK).tolist() == [True, True, False, True, True, True]
    _, _, _, kept = store.gather(torch.tensor([1, 2, 3]))
    assert kept.tolist() == [1, 3]


def test_a_truncated_file_is_an_error_not_garbage(tmp_path):
    store, _ = fill(tmp_path / "s", 10, (4,), torch.float32)
    path = tmp_path / "s" / "values.bin"
    path.write_bytes(path.read_bytes()[:64])      # 4 rows of 16 bytes left
    with pytest.raises(OSError, match="delete the cache directory"):
        store.gather(torch.tensor([2, 7]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_values_file_is_never_mapped(tmp_path):
    """A mapped file's touched pages count in RSS, and an epoch touches them all."""
    store, rows = fill(tmp_path / "s", 64, (256,), torch.float32)
    for chunk in torch.randperm(64).split(16):
        store.gather(chunk)
    maps = Path("/proc/self/maps").read_text()
    assert "values.bin" not in maps
    store.values.close()


def test_rows_that_do_not_fit_the_file_are_refused(tmp_path):
    from clipft.engine.cache.store import DiskRows
    rows = DiskRows(tmp_path / "values.bin", 4, (3,), torch.float32, create=True)
    try:
        rows.write(torch.tensor([0, 1]), torch.ones(2, 3))
        with pytest.raises(ValueError, match="do not fit"):
            rows.write(torch.tensor([2]), torch.ones(1, 4))          # would spill into row 3
        with pytest.raises(ValueError, match="do not fit"):
            rows.write(torch.tensor([2]), torch.ones(1, 3, dtype=torch.float64))
        rows.write(torch.tensor([], dtype=torch.long), torch.ones(0, 3))   # nothing to write
        got = rows.read(torch.tensor([0, 1, 2, 3]))
        assert torch.equal(got[:2], torch.ones(2, 3)) and torch.equal(got[2:], torch.zeros(2, 3))
    finally:
        rows.close()
