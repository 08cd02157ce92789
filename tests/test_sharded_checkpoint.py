"""Sharded (DCP) checkpoints under 2 gloo ranks, held to the single-process standard: no code runs from a
tampered .metadata, every file is checksummed in meta.json and checked before DCP reads anything (a damaged
newest checkpoint falls back to the one before), another layout is refused in one line, and pruning never
removes a later step."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemo_lite.testing import sharded
from nemo_lite.training import checkpoint as ckpt


@pytest.fixture(scope="module")
def pool():
    ranks = sharded.RankPool(2)
    yield ranks
    ranks.close()


def ok(results):
    for good, value in results:
        assert good, value[2] if isinstance(value, tuple) and len(value) == 3 else value
    return [value for _, value in results]


def refused(results):
    """The same one-line error on every rank."""
    assert all(not good for good, _ in results), results
    lines = {(value[0], value[1]) for _, value in results}
    assert len(lines) == 1, lines
    kind, line = lines.pop()
    assert "\n" not in line
    return kind, line


def test_a_tampered_metadata_is_refused_without_running_it(pool, tmp_path):
    root = tmp_path / "ckpt"
    ok(pool.run(sharded.train, str(root), 1, 2))
    path = root / "step_000001"
    marker = tmp_path / "ran"
    (path / "dcp" / ".metadata").write_bytes(sharded.marker_pickle(str(marker)))
    meta = json.loads((path / ckpt.META_FILE).read_text())
    if "files" in meta:  # the attacker rewrites the manifest too
        meta["files"]["dcp/.metadata"] = ckpt.file_record(path / "dcp" / ".metadata")
        (path / ckpt.META_FILE).write_text(json.dumps(meta))
    results = pool.run(sharded.load, str(path))
    assert not marker.exists()
    kind, line = refused(results)
    assert kind == "CheckpointDamagedError"
    assert line.startswith("dcp/.metadata names posix.mkdir, which is not part of DCP checkpoint metadata")


def test_meta_json_lists_every_file_with_its_size_and_checksum(pool, tmp_path):
    ok(pool.run(sharded.train, str(tmp_path), 1, 2))
    path = tmp_path / "step_000001"
    meta = json.loads((path / ckpt.META_FILE).read_text())
    on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert sorted(meta["files"]) == [n for n in on_disk if n != ckpt.META_FILE]
    assert {"dcp/.metadata", "rank00000.pt", "rank00001.pt"} <= set(meta["files"])
    for name, record in meta["files"].items():
        assert record == ckpt.file_record(path / name)
    assert meta["layout"] == sharded.LAYOUT and meta["world_size"] == 2


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_shard_is_named_on_every_rank_and_the_one_before_is_used(pool, tmp_path, damage):
    states = ok(pool.run(sharded.train, str(tmp_path), 2, 2))[0]
    newest = tmp_path / "step_000002"
    shard = sorted((newest / "dcp").glob("*.distcp"))[-1]
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40  # one exponent-sized bit, same size
    else:
        data = data[: len(data) // 2]
    shard.write_bytes(bytes(data))
    kind, line = refused(pool.run(sharded.load, str(newest)))
    assert kind == "CheckpointDamagedError"
    expect = "does not match its checksum" if damage == "flip" else f"has {len(data)} bytes"
    assert line.startswith(f"dcp/{shard.name} ") and expect in line
    (step, state, notes), _ = ok(pool.run(sharded.resume, str(tmp_path)))
    assert step == 1 and notes[0].startswith(f"step_000002: dcp/{shard.name} ")
    assert state.keys() == states[1].keys()
    for key, value in states[1].items():
        assert state[key].equal(value), key


@pytest.mark.parametrize("record", [{"b9tes": 1273, "crc32": 1}, {"bytes": "1273", "crc32": 1}, 7])
def test_a_damaged_manifest_record_is_refused_on_every_rank_not_a_hang(pool, tmp_path, record):
    """A bit flipped in meta.json's record of a file ("bytes" -> "b9tes", found by the property test below): rank 0,
    which checks the manifest, refuses it in one line that reaches every rank, and the resume uses the one before,
    where rank 0 used to raise a KeyError alone and leave rank 1 waiting for its verdict."""
    states = ok(pool.run(sharded.train, str(tmp_path), 2, 2))[0]
    newest = tmp_path / "step_000002"
    meta = json.loads((newest / ckpt.META_FILE).read_text())
    meta["files"]["rank00000.pt"] = record
    (newest / ckpt.META_FILE).write_text(json.dumps(meta))
    kind, line = refused(pool.run(sharded.load, str(newest)))
    assert kind == "CheckpointDamagedError" and line.startswith("meta.json's record of rank00000.pt is not a size")
    (step, state, notes), _ = ok(pool.run(sharded.resume, str(tmp_path)))
    assert step == 1 and notes[0].startswith("step_000002: meta.json's record of rank00000.pt")
    for key, value in states[1].items():
        assert state[key].equal(value), key


def test_another_layout_is_refused_with_what_differs(pool, tmp_path):
    ok(pool.run(sharded.train, str(tmp_path), 1, 2))
    other = {**sharded.LAYOUT, "data.seq_len": 4}
    kind, line = refused(pool.run(sharded.resume, str(tmp_path), other))
    assert kind == "ResumeError"
    assert "it was saved by a run of another shape (data.seq_len 8 -> 4)" in line


def test_a_save_after_resuming_an_older_step_prunes_no_later_one(pool, tmp_path):
    ok(pool.run(sharded.train, str(tmp_path), 4, 2))  # steps 3 and 4 remain
    ok(pool.run(sharded.train, str(tmp_path), 1, 1, None, 2))  # a run resumed at step 1 saves step 2
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000002", "step_000003", "step_000004"]
    ok(pool.run(sharded.train, str(tmp_path), 1, 1, None, 3))  # re-saving step 3 swaps it, prunes step 2
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    assert not list(tmp_path.glob(ckpt.TMP_PREFIX + "*"))


STEPS = 3


@pytest.fixture(scope="module")
def straight(pool, tmp_path_factory):
    return ok(pool.run(sharded.train, str(tmp_path_factory.mktemp("straight")), STEPS, 2))[0]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fault=st.sampled_from(["kill", "flip", "truncate"]),
    at_step=st.integers(1, STEPS),
    stage=st.sampled_from(sharded.STAGES),
    file=st.integers(0, 63),
    where=st.floats(0.0, 0.999),
    bit=st.integers(0, 7),
)
def test_a_torchrun_resume_is_exact_or_one_line(
    pool, straight, tmp_path_factory, fault, at_step, stage, file, where, bit
):
    """Kill every rank at a random stage of a random save, or flip a bit / cut short a random file of the newest
    checkpoint: the resume loads a checkpoint whose weights and optimizer state are bit for bit a straight run's
    at its step (the newest whole one for a kill), or refuses in one line; never a damaged weight."""
    root = tmp_path_factory.mktemp("faulted")
    if fault == "kill":
        results = pool.run(sharded.train, str(root), STEPS, 2, (at_step, stage))
        assert all(not good and value[0] == "Killed" for good, value in results), results
        whole = at_step if stage == "renamed" else at_step - 1
    else:
        ok(pool.run(sharded.train, str(root), STEPS, 2))
        newest = ckpt.latest_checkpoint(root)
        files = sorted(p for p in newest.rglob("*") if p.is_file())
        target = files[file % len(files)]
        data = bytearray(target.read_bytes())
        if fault == "flip" and data:
            data[int(len(data) * where)] ^= 1 << bit
        else:
            data = data[: int(len(data) * where)]
        target.write_bytes(bytes(data))
        whole = None  # the newest if the change was harmless (meta.json's time), else the one before
    results = pool.run(sharded.resume, str(root))
    if not all(good for good, _ in results):
        kind, line = refused(results)  # one line, the same on every rank
        assert fault != "kill" and kind == "ResumeError", (kind, line)
        return
    (step, state, _), _ = [value for _, value in results]
    if whole is not None:
        assert step == (whole or None)
    if step is None:
        return
    assert state.keys() == straight[step].keys()
    for key, value in straight[step].items():
        assert state[key].equal(value), (step, key)


def test_the_batch_is_compared_as_a_global_batch_across_rank_counts(tmp_path):
    from nemo_lite.training.sharded_checkpoint import check_layout

    meta = {"world_size": 2, "layout": {"data.batch_size": 2, "data.seq_len": 64}}
    check_layout(tmp_path, meta, {"data.batch_size": 4, "data.seq_len": 64}, 1)  # 2 ranks x 2 rows = 1 x 4
    check_layout(tmp_path, meta, {"data.batch_size": 1, "data.seq_len": 64}, 4)
    with pytest.raises(ckpt.ResumeError, match=r"another shape \(data.batch_size x ranks 4 -> 2\)"):
        check_layout(tmp_path, meta, {"data.batch_size": 2, "data.seq_len": 64}, 1)
