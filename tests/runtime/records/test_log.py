"""The decision log on its own: frames, rotation, sealing, verification, recovery of a torn tail,
corruption in the middle, seqs without gaps across restarts."""
from __future__ import annotations

import os
import threading

import pytest

from uwrt.runtime.pb import pb, rec
from uwrt.runtime.records.format import frame, request_digest, scan, segments_of
from uwrt.runtime.records.log import DecisionLog
from uwrt.runtime.records.reader import records, verify
from uwrt.runtime.records.segments import RecordsError


def body(i: int, rng) -> bytes:
    r = rec.DecisionRecord(kind=rec.KIND_DECISION, request_id=f"r-{i}", rpc=rec.RPC_DECIDE,
                           request_digest=os.urandom(32), received_unix_ns=int(rng.integers(1, 2**62)))
    r.response.request_id = f"r-{i}"
    r.response.probability_of_default = float(rng.random())
    return r.SerializeToString()


def write(log: DecisionLog, bodies: list[bytes]) -> list[int]:
    done = threading.Event()
    got: list = []

    def then(x):
        got.append(x)
        done.set()

    log.submit(bodies, then)
    assert done.wait(10)
    assert isinstance(got[0], int), got
    return list(range(got[0], got[0] + len(bodies)))


def test_frames_round_trip_and_a_flipped_bit_is_caught(rng):
    payloads = [os.urandom(int(n)) for n in rng.integers(0, 300, 20)]
    buf = b"".join(frame(p) for p in payloads)
    assert [f.payload for f in scan(buf)] == payloads
    pos = int(rng.integers(0, len(buf)))
    bad = bytearray(buf)
    bad[pos] ^= 1 << int(rng.integers(0, 8))
    out = list(scan(bytes(bad)))
    assert type(out[-1]).__name__ == "BadFrame"


@pytest.mark.parametrize("durability", ["fsync", "interval"])
def test_write_rotate_seal_verify(tmp_path, rng, durability):
    log = DecisionLog(str(tmp_path), 0, durability=durability, interval_ms=5, segment_bytes=1500)
    log.start()
    seqs = []
    sent = {}
    for k in range(30):
        bodies = [body(100 * k + j, rng) for j in range(int(rng.integers(1, 6)))]
        seqs += write(log, bodies)
        for b in bodies:
            sent[len(sent) + 1] = b
    log.close()
    assert seqs == list(range(1, len(seqs) + 1))
    segs = segments_of(tmp_path / "w0")
    assert len(segs) > 2                                     # rotated by size
    rep = verify(tmp_path)
    assert rep.ok, rep.all_problems()
    assert rep.records == len(seqs) and all(s.sealed for s in rep.segments)
    got = {r.seq: r for _, r in records(tmp_path)}
    for seq, b in sent.items():
        r = rec.DecisionRecord()
        r.ParseFromString(b)
        r.seq = seq
        assert got[seq] == r


def test_restart_continues_the_seq_and_the_chain(tmp_path, rng):
    for _ in range(3):
        log = DecisionLog(str(tmp_path), 2)
        log.start()
        write(log, [body(i, rng) for i in range(3)])
        log.close()
    rep = verify(tmp_path)
    assert rep.ok, rep.all_problems()
    assert [r.seq for _, r in records(tmp_path)] == list(range(1, 10))


@pytest.mark.parametrize("durability", ["fsync", "interval"])
def test_when_a_submission_is_released_relative_to_its_fsync(tmp_path, rng, durability):
    """fsync: `then` runs only after the fdatasync; interval: `then` runs after the write, and a
    due fdatasync runs after it (a response never waits for one). The fsync is held on an event,
    so the order is observed, not timed."""
    log = DecisionLog(str(tmp_path), 0, durability=durability, interval_ms=1)
    entered, release = threading.Event(), threading.Event()
    real_sync = log.segments.sync

    def held_sync() -> None:
        entered.set()
        assert release.wait(30)
        real_sync()

    log.segments.sync = held_sync            # type: ignore[method-assign]
    log.start()
    released = threading.Event()
    log.submit([body(1, rng)], lambda _: released.set())
    assert entered.wait(30)                  # interval_ms=1: a sync is due at once in both modes
    if durability == "fsync":
        assert not released.is_set()          # still inside the fsync: not released
        release.set()
        assert released.wait(30)
    else:
        assert released.wait(30)              # released while the fsync is still held
        release.set()
    log.close()
    assert log.stats.fsyncs >= 1 and verify(tmp_path).ok


def test_a_second_process_cannot_take_a_held_writer(tmp_path):
    log = DecisionLog(str(tmp_path), 0)
    try:
        import subprocess
        import sys
        code = ("import sys; from uwrt.runtime.records.log import DecisionLog\n"
                "try:\n    DecisionLog(sys.argv[1], 0)\nexcept Exception as e:\n    print(type(e).__name__)")
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                             env={**os.environ}).stdout
        assert "RecordsError" in out
    finally:
        log.close()
    assert RecordsError.code.name == "UNAVAILABLE"


def _crash(tmp_path, rng, n_batches: int) -> tuple[str, int]:
    """A writer that writes and is then abandoned without sealing (as a SIGKILL leaves it)."""
    log = DecisionLog(str(tmp_path), 0)
    log.start()
    n = 0
    for k in range(n_batches):
        n += len(write(log, [body(k * 10 + j, rng) for j in range(3)]))
    log._closed = True                       # stop without sealing; release the lock like a dead process
    log._q.put(None)
    log._thread.join()
    os.close(log.segments._lock_fd)
    return log.segments.path, n


def test_a_torn_tail_is_truncated_and_sealed_at_start_up(tmp_path, rng):
    path, n = _crash(tmp_path, rng, 5)
    size = os.path.getsize(path)
    cut = int(rng.integers(1, 40))
    with open(path, "r+b") as fh:                         # the last record torn part-way
        fh.truncate(size - cut)
    rep = verify(tmp_path)
    assert rep.ok, rep.all_problems()                     # an open segment's incomplete frame is a note
    assert any(s.notes for s in rep.segments)
    log = DecisionLog(str(tmp_path), 0)
    assert log.recovery.truncated_bytes > 0 and log.recovery.sealed == [path]
    log.start()
    seqs = write(log, [body(999, rng)])
    log.close()
    assert seqs == [n]                                    # the torn record's seq is reused: it never existed
    rep = verify(tmp_path)
    assert rep.ok, rep.all_problems()
    assert rep.records == n
    assert [s.reason for s in rep.segments] == ["recovered", "shutdown"]


def test_garbage_after_the_last_record_is_a_torn_tail(tmp_path, rng):
    path, n = _crash(tmp_path, rng, 2)
    with open(path, "ab") as fh:
        fh.write(bytes(int(rng.integers(1, 100))))        # zeros, as a crash can leave after a size change
    log = DecisionLog(str(tmp_path), 0)
    log.close()
    assert verify(tmp_path).ok and verify(tmp_path).records == n


def test_corruption_in_the_middle_is_never_truncated_away(tmp_path, rng):
    path, n = _crash(tmp_path, rng, 6)
    with open(path, "rb") as fh:
        buf = bytearray(fh.read())
    frames = [f for f in scan(bytes(buf))]
    victim = frames[2]                                    # a record in the middle
    buf[victim.offset + 8 + 3] ^= 0xFF
    with open(path, "wb") as fh:
        fh.write(buf)
    size = len(buf)
    log = DecisionLog(str(tmp_path), 0)
    assert log.recovery.corrupt == [path]
    log.start()
    seqs = write(log, [body(1, rng)])
    log.close()
    assert seqs == [n + 1]                                # the seq continues after the corrupt segment's records
    assert os.path.getsize(path) == size                  # nothing cut
    rep = verify(tmp_path)
    assert not rep.ok
    assert any("payload CRC mismatch" in p for p in rep.all_problems())


def test_request_digest_is_canonical():
    a = pb.DecisionRequest(request_id="x")
    a.features["b"] = 1.0
    a.features["a"] = 2.0
    b = pb.DecisionRequest(request_id="x")
    b.features["a"] = 2.0
    b.features["b"] = 1.0
    assert request_digest(a)[1] == request_digest(b)[1]
    b.features["a"] = 2.5
    assert request_digest(a)[1] != request_digest(b)[1]
