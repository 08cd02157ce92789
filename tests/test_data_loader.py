"""PackedDataLoader over in-memory documents: resume, sharding, epochs, errors."""

from __future__ import annotations

import io
import itertools
import random
import subprocess
import sys

import pytest
import torch

from nemo_lite.components.datasets import Document, PackedDataLoader
from nemo_lite.testing.data import ListSource

EOS = 0


def random_docs(n: int = 60, seed: int = 0, max_len: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 500) for _ in range(rng.choice([0, rng.randrange(1, max_len)]))] for _ in range(n)]


def make_loader(docs=None, *, shuffle=True, rank=0, world_size=1, prefetch=2, **kw) -> PackedDataLoader:
    source = ListSource(random_docs() if docs is None else docs, shuffle=shuffle, seed=3)
    kw.setdefault("seq_len", 16)
    kw.setdefault("batch_size", 2)
    return PackedDataLoader(source, eos_id=EOS, rank=rank, world_size=world_size, prefetch=prefetch, **kw)


def take(loader: PackedDataLoader, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(loader, n))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() == {"input_ids", "labels", "position_ids"}
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_batches_are_cpu_int64():
    (batch,) = take(make_loader(), 1)
    for v in batch.values():
        assert v.shape == (2, 16) and v.dtype == torch.int64 and v.device.type == "cpu"


@pytest.mark.parametrize("k", [1, 3, 7, 20])  # 60 docs ~ 1000 tokens ~ 2 epochs in 20 batches
@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_gives_the_same_next_batches(k, prefetch):
    reference = take(make_loader(prefetch=prefetch), k + 8)
    loader = make_loader(prefetch=prefetch)
    take(loader, k)
    state = loader.state_dict()
    resumed = make_loader(prefetch=prefetch)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 8), reference[k:])
    assert resumed.stats == make_loader_stats_after(reference, k + 8, prefetch)


def make_loader_stats_after(_reference, n: int, prefetch: int) -> dict[str, int]:
    loader = make_loader(prefetch=prefetch)
    take(loader, n)
    return loader.stats


def test_resume_across_epoch_boundary_through_torch_save():
    loader = make_loader()
    epochs = []
    for batch_index, _ in enumerate(loader):
        epochs.append(loader.epoch)
        if batch_index == 40:
            break
    first_new_epoch = epochs.index(1)
    for k in (first_new_epoch - 1, first_new_epoch, first_new_epoch + 1):
        reference = take(make_loader(), k + 5)
        loader = make_loader()
        take(loader, k)
        buf = io.BytesIO()
        torch.save(loader.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        resumed = make_loader()
        resumed.load_state_dict(state)
        assert_same_batches(take(resumed, 5), reference[k:])


def test_state_is_plain_python():
    loader = make_loader()
    take(loader, 3)
    state = loader.state_dict()

    def check(x):
        if isinstance(x, dict):
            assert all(isinstance(k, str) for k in x)
            for v in x.values():
                check(v)
        elif isinstance(x, list):
            for v in x:
                check(v)
        else:
            assert type(x) in (int, str), type(x)

    check(state)


def test_iterating_again_continues_and_reset_restarts():
    reference = take(make_loader(), 6)
    loader = make_loader()
    got = take(loader, 2) + take(loader, 4)  # a second iter() picks up after the last batch handed out
    assert_same_batches(got, reference)
    loader.reset()
    assert_same_batches(take(loader, 2), reference[:2])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_an_older_iterator_stops_after_a_newer_one_starts(prefetch):
    loader = make_loader(prefetch=prefetch)
    old = iter(loader)
    next(old)
    new = iter(loader)
    next(new)
    with pytest.raises(RuntimeError, match="closed by a later iter"):
        next(old)
    next(new)  # the newest one goes on
    loader.load_state_dict(loader.state_dict())
    with pytest.raises(RuntimeError, match="closed by a later"):
        next(new)


def test_prefetch_does_not_change_batches():
    assert_same_batches(take(make_loader(prefetch=0), 12), take(make_loader(prefetch=4), 12))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_rows_that_cover_the_single_rank_stream(world_size):
    steps = 6
    single = take(make_loader(batch_size=2 * world_size), steps)  # one rank, same global batch
    per_rank = [take(make_loader(rank=r, world_size=world_size), steps) for r in range(world_size)]
    for step in range(steps):
        rows = single[step]["input_ids"]
        for r in range(world_size):
            for key in ("input_ids", "labels", "position_ids"):
                # row i of a global step goes to rank i % world_size
                assert torch.equal(per_rank[r][step][key], single[step][key][r::world_size])
        got = torch.cat([per_rank[r][step]["input_ids"] for r in range(world_size)])
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, rows.tolist()))


def test_sharded_resume():
    loader = make_loader(rank=1, world_size=3)
    take(loader, 4)
    reference = take(make_loader(rank=1, world_size=3), 9)[4:]
    resumed = make_loader(rank=1, world_size=3)
    resumed.load_state_dict(loader.state_dict())
    assert_same_batches(take(resumed, 5), reference)


def test_finite_epochs_stop_at_the_same_step_on_every_rank():
    counts = []
    for r in range(3):
        counts.append(sum(1 for _ in make_loader(rank=r, world_size=3, batch_size=1, num_epochs=2)))
    assert len(set(counts)) == 1 and counts[0] > 0
    total_tokens = 2 * sum(len(d) + 1 for d in random_docs() if d)
    assert counts[0] == (total_tokens - 1) // 16 // 3


def test_shuffle_is_deterministic_and_changes_per_epoch():
    docs = [[i + 1] * 4 for i in range(30)]
    a = ListSource(docs, shuffle=True, seed=1)
    b = ListSource(docs, shuffle=True, seed=1)
    assert list(a.documents(0, 0)) == list(b.documents(0, 0))
    assert list(a.documents(0, 0)) != list(a.documents(1, 0))
    assert list(a.documents(0, 7)) == list(a.documents(0, 0))[7:]
    assert list(ListSource(docs, shuffle=True, seed=2).documents(0, 0)) != list(a.documents(0, 0))


def test_no_documents_is_an_error():
    with pytest.raises(ValueError, match="no documents in in-memory documents"):
        take(make_loader([]), 1)
    with pytest.raises(ValueError, match="no documents in in-memory documents: all 3 documents are empty"):
        take(make_loader([[], [], []]), 1)


def test_too_little_data_for_one_step_is_an_error():
    with pytest.raises(ValueError, match="fewer than one step"):
        take(make_loader([[1, 2, 3]], num_epochs=1), 1)


def test_small_source_loops_forever_by_default():
    batches = take(make_loader([[1, 2, 3]], seq_len=8, batch_size=1), 5)
    assert batches[0]["input_ids"].tolist() == [[1, 2, 3, EOS, 1, 2, 3, EOS]]


def test_errors_from_the_source_reach_the_consumer():
    class Broken:
        description, has_prompts = "a broken source", False

        def documents(self, epoch, start):
            yield from [Document([1, 2, 3])] * 10
            raise RuntimeError("disk on fire")

    loader = PackedDataLoader(Broken(), seq_len=4, batch_size=1, eos_id=EOS, prefetch=2)
    with pytest.raises(RuntimeError, match="disk on fire"):
        take(loader, 100)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_pin_memory_without_cuda_warns_and_still_yields():
    with pytest.warns(UserWarning, match="pin_memory=True ignored"):
        loader = make_loader(pin_memory=True)
    assert take(loader, 1)[0]["input_ids"].shape == (2, 16)


def test_bad_rank_and_bad_state():
    with pytest.raises(ValueError, match="rank"):
        make_loader(rank=2, world_size=2)
    with pytest.raises(ValueError, match="version"):
        make_loader().load_state_dict({"epoch": 0})


def test_import_needs_torch_alone():
    code = (
        "import sys\n"
        "for m in ('datasets', 'transformers', 'tokenizers', 'pyarrow', 'omegaconf', 'hydra'):\n"
        "    sys.modules[m] = None\n"
        "import nemo_lite.components.datasets as d\n"
        "rows = list(d.pack_documents([[1, 2, 3]], seq_len=2, eos_id=0))\n"
        "assert len(rows) == 1\n"
        "d.resolve_data_config(d.DataConfig(source='a.jsonl,b.jsonl'), pretrained_path=None, pin_memory=False)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
