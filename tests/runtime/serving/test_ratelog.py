"""RateLimitedLog: at most `burst` lines per interval per kind, the rest counted and reported."""
import asyncio
import logging

from uwrt.runtime.serving.ratelog import RateLimitedLog


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make(caplog, **kw):
    caplog.set_level(logging.INFO, logger="t.ratelog")
    return RateLimitedLog(logging.getLogger("t.ratelog"), **kw)


def messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "t.ratelog"]


def test_burst_then_summary_when_the_kind_logs_again(caplog):
    clock = Clock()
    rl = make(caplog, burst=3, interval_s=10.0, clock=clock)
    logged = [rl.log("bad", logging.INFO, "bad %d", i) for i in range(50)]
    assert logged == [True] * 3 + [False] * 47
    assert rl.log("other", logging.INFO, "other") is True          # kinds are independent
    clock.t += 10.0
    assert rl.log("bad", logging.INFO, "bad again") is True
    msgs = messages(caplog)
    assert msgs[:3] == ["bad 0", "bad 1", "bad 2"]
    assert msgs[3:] == ["other", "suppressed 47 similar 'bad' messages in the last 10 s", "bad again"]
    assert rl.counts() == {"bad": 51, "other": 1}


def test_flush_reports_what_was_suppressed_once(caplog):
    rl = make(caplog, burst=1, interval_s=10.0, clock=Clock())
    for _ in range(5):
        rl.log("k", logging.WARNING, "x")
    rl.flush()
    rl.flush()
    assert messages(caplog) == ["x", "suppressed 4 similar 'k' messages in the last 0 s"]


def test_a_flood_that_stops_is_reported_when_its_interval_ends(caplog):
    """On the event loop a timer reports the dropped lines at the end of the interval, with no
    later line of that kind and no flush."""
    async def main():
        rl = make(caplog, burst=2, interval_s=0.2)
        for i in range(100):
            rl.log("flood", logging.INFO, "f %d", i)
        assert messages(caplog) == ["f 0", "f 1"]
        await asyncio.sleep(0.6)
        return rl

    rl = asyncio.run(main())
    msgs = messages(caplog)
    assert len(msgs) == 3 and msgs[2].startswith("suppressed 98 similar 'flood' messages")
    assert rl.log("flood", logging.INFO, "after") is True               # a new interval began
    rl.flush()
    assert messages(caplog)[3:] == ["after"]


def test_internal_errors_keep_their_traceback(caplog):
    rl = make(caplog, burst=1)
    try:
        raise ValueError("boom")
    except ValueError as e:
        rl.log("internal", logging.ERROR, "internal error", exc_info=e)
    [rec] = [r for r in caplog.records if r.name == "t.ratelog"]
    assert rec.exc_info is not None and rec.exc_info[0] is ValueError
