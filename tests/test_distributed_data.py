"""The data position in a checkpoint is a global row: it holds when the number of ranks or the batch size
changes on resume (docs/distributed.md, Resharding)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from nemo_lite.components.datasets import PackedDataLoader
from nemo_lite.testing.data import ListSource

EOS = 0


def loader(*, rank: int, world_size: int, batch_size: int) -> PackedDataLoader:
    rng = random.Random(0)
    docs = [[rng.randrange(1, 500) for _ in range(rng.randrange(1, 40))] for _ in range(80)]
    source = ListSource(docs, shuffle=True, seed=3)
    return PackedDataLoader(source, seq_len=16, batch_size=batch_size, eos_id=EOS, rank=rank, world_size=world_size)


def global_rows(batches_per_rank: list[list[dict[str, torch.Tensor]]]) -> list[torch.Tensor]:
    """The steps' rows in stream order: row i of a step is on rank i % world_size."""
    world = len(batches_per_rank)
    rows = []
    for step in zip(*batches_per_rank, strict=True):
        per_rank = [list(batch["input_ids"]) for batch in step]
        rows += [per_rank[i % world][i // world] for i in range(sum(map(len, per_rank)))]
    return rows


@pytest.mark.parametrize(("world_size", "batch_size"), [(1, 4), (1, 3), (3, 1), (4, 2)])
def test_a_resumed_run_continues_at_the_same_global_row(world_size, batch_size):
    stream = global_rows([list(itertools.islice(loader(rank=0, world_size=1, batch_size=1), 40))])
    saver = loader(rank=0, world_size=2, batch_size=2)  # 3 steps of 2 ranks x 2 rows: rows 0-11 are used
    list(itertools.islice(saver, 3))
    state = saver.state_dict()
    assert state["rows"] == 12
    resumed = []
    for rank in range(world_size):
        part = loader(rank=rank, world_size=world_size, batch_size=batch_size)
        part.load_state_dict(state)
        resumed.append(list(itertools.islice(part, 2)))
    rows = global_rows(resumed)
    assert len(rows) == 2 * world_size * batch_size
    for got, want in zip(rows, stream[12:], strict=False):
        assert torch.equal(got, want)
