"""The fault tier's checker on hand-written histories: it must catch each anomaly it counts
(a lost job, a resurrection, a duplicate id, an unexpected delivery), count what it
reports (redeliveries, indeterminate pushes, unavailability), and pass a clean history."""

from __future__ import annotations

from typing import Any

from tests.faults.checker import check, unavailability
from tests.faults.history import FAIL, INFO, OK, History, outcome_of_error


class Script:
    """Writes a history by hand: each operation with its invoke and completion times."""

    def __init__(self) -> None:
        self.history = History()
        self.index = 0

    def _op(self, f: str, queue: str, value: dict[str, Any], kind: str | None, t0: float,
            t1: float, done_value: dict[str, Any] | None = None) -> None:
        i = self.index
        self.index += 1
        entries = self.history.entries
        entries.append({"index": i, "type": "invoke", "f": f, "process": "p", "time": t0,
                        "queue": queue, "value": value})
        if kind is not None:
            entries.append({"index": i, "type": kind, "f": f, "process": "p", "time": t1,
                            "queue": queue, "value": done_value or value})

    def push(self, payload: str, job_id: int | None, kind: str = OK, t: float = 0.0,
             queue: str = "q") -> None:
        done = {"payload": payload, "id": job_id} if kind == OK else None
        self._op("push", queue, {"payload": payload}, kind, t, t + 0.001, done)

    def pull(self, jobs: list[tuple[str, int, int]], t: float, queue: str = "q") -> None:
        value = {"jobs": [{"payload": p, "id": i, "lease": lease} for p, i, lease in jobs]}
        self._op("pull", queue, {}, OK, t, t + 0.001, value)

    def ack(self, payload: str, job_id: int, lease: int, kind: str = OK, t: float = 0.0,
            queue: str = "q") -> None:
        self._op("ack", queue, {"payload": payload, "id": job_id, "lease": lease}, kind, t,
                 t + 0.001)

    def fault(self, f: str, t: float, queues: list[str]) -> None:
        self.history.entries.append({"type": "fault", "f": f, "time": t,
                                     "value": {"kind": "kill-primary", "target": "node-0",
                                               "queues": queues}})

    def lifecycle(self, payload: str, job_id: int, t: float) -> None:
        """Pushed, delivered once, acked: the happy path of one job."""
        self.push(payload, job_id, t=t)
        self.pull([(payload, job_id, 100 + job_id)], t=t + 0.01)
        self.ack(payload, job_id, 100 + job_id, t=t + 0.02)


def test_a_clean_history_has_no_anomaly_and_counts_everything() -> None:
    s = Script()
    for n in range(10):
        s.lifecycle(f"p{n}", n, t=n * 0.1)
    report = check(s.history)
    assert report.ok, report.summary()
    assert report.counts() == {"lost": 0, "resurrected": 0, "duplicate_ids": 0, "unexpected": 0}
    assert (report.pushes[OK], report.deliveries, report.delivered, report.acks[OK]) == (
        10, 10, 10, 10)
    assert report.redeliveries == 0 and report.indeterminate == 0


def test_an_acknowledged_push_never_delivered_is_lost() -> None:
    s = Script()
    s.lifecycle("p0", 0, t=0)
    s.push("p1", 1, t=0.1)  # answered ok, never delivered
    s.push("p2", None, kind=INFO, t=0.2)  # unknown outcome, never delivered: not lost
    s.push("p3", None, kind=FAIL, t=0.3)  # refused, never delivered: not lost
    report = check(s.history)
    assert report.lost == ["p1"]
    assert not report.ok and "lost: ['p1']" in report.examples()
    assert report.indeterminate == 1 and report.indeterminate_delivered == 0


def test_a_delivery_after_the_ack_was_acknowledged_is_a_resurrection() -> None:
    s = Script()
    s.lifecycle("p0", 7, t=0)  # acked ok at 0.021
    s.pull([("p0", 7, 300)], t=1.0)  # the same job handed out again after that
    report = check(s.history)
    assert [r["payload"] for r in report.resurrected] == ["p0"]
    assert report.resurrected[0]["pulled_at"] == 1.0
    assert report.redeliveries == 1 and not report.ok


def test_a_redelivery_before_any_acknowledged_ack_is_only_counted() -> None:
    s = Script()
    s.push("p0", 7, t=0)
    s.pull([("p0", 7, 100)], t=0.1)
    s.ack("p0", 7, 100, kind=INFO, t=0.2)  # the answer was lost: the lease may still run
    s.pull([("p0", 7, 200)], t=3.0)  # lease expired, handed out again
    s.ack("p0", 7, 200, t=3.1)
    s.ack("p0", 7, 100, kind=FAIL, t=3.2)  # the old lease is refused
    report = check(s.history)
    assert report.ok, report.summary()
    assert report.redeliveries == 1 and report.deliveries == 2 and report.delivered == 1
    assert (report.acks[OK], report.acks[FAIL], report.acks[INFO]) == (1, 1, 1)


def test_one_id_for_two_payloads_is_a_duplicate_id() -> None:
    s = Script()
    s.lifecycle("p0", 5, t=0)
    s.lifecycle("p1", 5, t=0.1)  # a second push answered with the same id
    s.lifecycle("p2", 6, t=0.2)
    s.pull([("p3", 6, 999)], t=0.3)  # id 6 delivered with another payload (p3 pushed below)
    s.push("p3", 8, t=0.25)
    report = check(s.history)
    assert report.duplicate_ids == [{"id": 5, "payloads": ["p0", "p1"]},
                                    {"id": 6, "payloads": ["p2", "p3"]}]
    assert not report.ok


def test_a_delivery_nobody_pushed_or_of_a_refused_push_is_unexpected() -> None:
    s = Script()
    s.push("p0", None, kind=FAIL, t=0)  # refused: must never show up
    s.push("p1", None, kind=INFO, t=0)  # unknown: may show up
    s.pull([("p0", 1, 10), ("p1", 2, 11), ("ghost", 3, 12)], t=0.5)
    report = check(s.history)
    assert report.unexpected == ["ghost", "p0"]
    assert report.indeterminate_delivered == 1 and not report.ok


def test_an_invoke_without_completion_is_indeterminate() -> None:
    s = Script()
    s._op("push", "q", {"payload": "p0"}, None, 0.0, 0.0)
    s.pull([("p0", 1, 10)], t=1.0)
    report = check(s.history)
    assert report.ok and report.indeterminate == 1 and report.indeterminate_delivered == 1


def test_unavailability_is_the_longest_gap_overlapping_the_fault_on_its_queues() -> None:
    s = Script()
    for n in range(10):  # q-a: every 0.1 s until 1.0, then nothing until 3.5
        s.push(f"a{n}", n, t=n * 0.1, queue="q-a")
    s.push("a-late", 50, t=3.5, queue="q-a")
    s.push("a-later", 51, t=3.6, queue="q-a")
    for n in range(40):  # q-b: never interrupted (not the fault's queue)
        s.push(f"b{n}", 100 + n, t=n * 0.1, queue="q-b")
    s.fault("start", 1.0, ["q-a"])
    s.fault("end", 2.0, ["q-a"])
    report = check(s.history)
    [window] = report.windows
    assert window.recovered and window.queues == ["q-a"]
    assert abs(window.seconds - (3.501 - 0.901)) < 1e-6
    assert report.lost  # (these pushes were never delivered; only the window matters here)


def test_a_fault_with_no_success_after_it_is_not_recovered() -> None:
    window = unavailability("cut", "node-1", 1.0, 2.0, ["q"], [0.5, 0.9], end=10.0)
    assert not window.recovered and window.seconds == 10.0 - 0.9
    window = unavailability("cut", "node-1", 1.0, 2.0, ["q"], [0.5, 0.9, 1.5, 2.5, 9.0],
                            end=10.0)
    assert window.recovered and window.seconds == 2.5 - 1.5  # the 2.5 -> 9.0 gap is after it


def test_history_round_trips_through_json_lines(tmp_path: Any) -> None:
    h = History()
    i = h.invoke("w0", "push", "q", {"payload": "p0"})
    h.ok(i, {"payload": "p0", "id": 1})
    j = h.invoke("w0", "ack", "q", {"payload": "p0", "id": 1, "lease": 5})
    h.failed(j, "Lease expired for job 1")
    k = h.invoke("w0", "push", "q", {"payload": "p1"})
    h.failed(k, "Unavailable: node node-1 at 127.0.0.12:1 is not reachable (reset)")
    h.invoke("w0", "push", "q", {"payload": "p2"})
    assert h.close_open() == 1
    h.fault("start", "kill-primary", "node-1", ["q"])
    loaded = History.load(h.dump(tmp_path / "h.jsonl"))
    assert loaded.entries == h.entries
    kinds = [e["type"] for e in loaded.entries if e.get("index") is not None]
    assert kinds == ["invoke", "ok", "invoke", "fail", "invoke", "info", "invoke", "info"]


def test_error_texts_map_to_fail_only_when_nothing_was_applied() -> None:
    assert outcome_of_error("Lease expired for job 3") == FAIL
    assert outcome_of_error("Job 3 not found") == FAIL
    assert outcome_of_error("Unavailable: shard s-1 has no quorum") == FAIL
    assert outcome_of_error(
        "Unavailable: shard s-1 has no quorum (the write may have been applied)") == INFO
    assert outcome_of_error("Unavailable: node n at a:1 is not reachable (lost)") == INFO
    assert outcome_of_error("Unavailable: primary changed") == INFO
    assert outcome_of_error("connection to 127.0.0.2:1 lost") == INFO
    assert outcome_of_error("TimeoutError") == INFO
