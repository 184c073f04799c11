"""Every record the node persists: the WAL record types and the snapshot format.

This module is the one place that lists them; each is a JSON array whose
first element is the type code and whose second is the time (ms) the change
happened. The engine produces them (``Engine.journal``) and applies them
(``Engine.apply``) with the same code live and in recovery, so a replay
rebuilds exactly the state the live node had. Payloads (``data``, results)
are embedded as raw JSON.

WAL records (one per state change, appended before the reply is sent):

  PUSH      [1, t, queue, [JOBSPEC, ...]]   jobs created at t (PUSH: one, PUSHB: many)
            JOBSPEC = [id, data, priority, run_at, max_attempts, backoff, ttl, timeout,
                       unique_key, depends_on, blob_size]
            blob_size > 0: the payload is in the blob store (data is null), see blobs.py
  START     [2, t, [id, ...]]               jobs pulled; their attempt (lease token) starts at t
  ACK       [3, t, [id, ...], results|null] attempts completed; results[i] belongs to id[i]
  FAIL      [4, t, id, error]               attempt failed by the worker: retry or DLQ
  RELEASE   [5, t, [id, ...], reason]       leases lost (worker gone, recovery): counted attempt,
                                            back to waiting at once, or DLQ when exhausted
  TIMEOUT   [6, t, id]                      lease/timeout passed: a failed attempt with backoff
  PROMOTE   [7, t, [id, ...]]               delayed -> waiting (run_at reached)
  EXPIRE    [8, t, [id, ...]]               ttl passed before the job was ever pulled
  CANCEL    [9, t, id]                      cancelled (any live state)
  PROGRESS  [10, t, id, progress, message]
  RETRYDLQ  [11, t, queue, [id, ...]]       dead -> waiting with attempts 0
  QUEUE     [12, t, queue, SETTINGS]        pause/resume, rate and concurrency limits
            SETTINGS = {"paused": bool, "rate_limit": int|null, "concurrency_limit": int|null}
  CRON      [13, t, name, CRONSPEC]         cron created or replaced
            CRONSPEC = {"queue", "data", "schedule", "priority", "next_run"}
  CRONDEL   [14, t, name]                   cron deleted
  CRONFIRE  [15, t, name, next_run, queue, [JOBSPEC]]
                                            cron fired at t: its next run and the job it pushed,
                                            in one record (so a tick fires exactly once); no
                                            JOBSPEC when the memory budget was spent
  DROP      [16, t, [slot, ...]]            every trace of these slots removed (after a move away;
                                            before an import, so a repeated import starts clean)
  PARENTEND [17, t, parent, child, state]   a parent in another slot ended (completed, dead,
                                            cancelled, expired, unknown): release or kill child
  WATCH     [18, t, parent, child]          this node's parent is watched for a child elsewhere
                                            (also a snapshot record: one per open watch)
  NOTIFIED  [19, t, parent, child]          the child's owner has the parent's end: watch done
  TERM      [20, t, term, primary, lsn]     a shard's primary starts ``term`` (DESIGN §9): the
                                            first record it writes in that term, at log position
                                            ``lsn``; followers compare term histories to find
                                            where their logs diverge
  TOUCH is not logged: leases do not survive a restart (recovered active jobs are released).

Snapshot (a file of the same framing; SNAP_BEGIN first, SNAP_END last, anything else
between is state, in this order per slot):

  SNAP_BEGIN [100, t, format_version, wal_position, lsn]
                                            lsn: the log position the state is at (format 2);
                                            format 3 adds CJOBS (formats 1 and 2 still load)
  SLOT       [101, t, slot, next_seq]       the id counter of a slot (ids never reused)
  QUEUE      [12, t, queue, SETTINGS]       (same record as in the WAL)
  JOB        [103, t, queue, JOBSTATE]      one live job
             JOBSTATE = [id, data, priority, created_at, run_at, started_at, attempts, state,
                         max_attempts, backoff, ttl, timeout, unique_key, depends_on,
                         progress, progress_msg, error, pending_parents, blob_size]
  CJOBS      [106, t, queue, priority, [id, ...], [run_at, ...], [size, ...], packed]
                                            compact waiting jobs (format 3; jobs.Lane): plain
                                            jobs of one priority, never pulled, in ready order,
                                            created at their run_at; ``packed`` is the base64
                                            of their payloads' raw JSON, one after the other
                                            (size[i] bytes each): loaded in bulk, unparsed
  FINISHED   [104, t, id, state, result]    a completed/cancelled/expired job kept for results
  CRON       [13, t, name, CRONSPEC]
  WATCH      [18, t, parent, child]         an open watch (see dependencies.py)
  TERMS      [105, t, [[term, lsn], ...]]   the term history: where each term began
  SNAP_END   [199, t, record_count]

Log positions (LSNs): the n-th record ever appended to a node's log has LSN n; a snapshot
records the LSN its state is at, and the records replayed after it continue from there. A
follower holds the primary's records at the same LSNs (replication.py).

A slot export for a move (DESIGN §5) is the snapshot format restricted to that slot.
"""

from __future__ import annotations

from typing import Any

PUSH = 1
START = 2
ACK = 3
FAIL = 4
RELEASE = 5
TIMEOUT = 6
PROMOTE = 7
EXPIRE = 8
CANCEL = 9
PROGRESS = 10
RETRYDLQ = 11
QUEUE = 12
CRON = 13
CRONDEL = 14
CRONFIRE = 15
DROP = 16
PARENTEND = 17
WATCH = 18
NOTIFIED = 19
TERM = 20

SNAP_BEGIN = 100
SLOT = 101
JOB = 103
FINISHED = 104
TERMS = 105
CJOBS = 106
SNAP_END = 199

SNAPSHOT_FORMAT = 3

NAMES = {code: name for name, code in list(globals().items())
         if name.isupper() and type(code) is int and name != "SNAPSHOT_FORMAT"}

Record = list[Any] | tuple[Any, ...]
