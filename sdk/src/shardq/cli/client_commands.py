"""The client's sub-commands of ``shardq``: push, pull, stats, queues, cron, queue.

Each talks to a gateway or a node over the protocol through ``AsyncClient`` and prints
the answer as JSON. They come with the SDK (no server package needed). Must not: import
server code.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from shardq.client import AsyncClient
from shardq.errors import ShardqError

from .flags import flag
from .subcommands import SubCommand


def client_flags(p: argparse.ArgumentParser) -> None:
    flag(p, "--address", "127.0.0.1:6789", help="gateway or node address host:port")
    flag(p, "--token", None, help="client token")


def call(args: argparse.Namespace, fn: Callable[[AsyncClient], Awaitable[Any]]) -> int:
    """Run ``fn`` with a client connected to ``--address``; print its result as JSON."""

    async def main() -> Any:
        async with AsyncClient(args.address, token=args.token) as client:
            return await fn(client)

    try:
        result = asyncio.run(main())
    except ShardqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result is not None:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def _json_data(text: str) -> tuple[Any, bool]:
    """(the payload, True) or (None, False) after saying why ``text`` is not JSON."""
    try:
        return orjson.loads(text), True
    except orjson.JSONDecodeError as exc:
        print(f"error: data is not valid JSON: {exc}", file=sys.stderr)
        return None, False


# -- push, pull, stats, queues ----------------------------------------------------------------


def _push_arguments(p: argparse.ArgumentParser) -> None:
    client_flags(p)
    p.add_argument("queue")
    p.add_argument("data", help="the job's JSON payload")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--delay", type=int, default=None, help="ms")
    p.add_argument("--max-attempts", type=int, default=None)
    p.add_argument("--backoff", type=int, default=None, help="ms")
    p.add_argument("--unique-key", default=None)


def run_push(args: argparse.Namespace) -> int:
    data, valid = _json_data(args.data)
    if not valid:
        return 2

    async def push(client: AsyncClient) -> Any:
        job_id = await client.push(
            args.queue, data, priority=args.priority, delay=args.delay,
            max_attempts=args.max_attempts, backoff=args.backoff, unique_key=args.unique_key,
        )
        return {"id": job_id}

    return call(args, push)


def _pull_arguments(p: argparse.ArgumentParser) -> None:
    client_flags(p)
    p.add_argument("queue")
    p.add_argument("--timeout", type=int, default=5000, help="ms to wait")
    p.add_argument("--ack", action="store_true", help="ack the job right away")


def run_pull(args: argparse.Namespace) -> int:
    async def pull(client: AsyncClient) -> Any:
        job = await client.pull(args.queue, timeout=args.timeout)
        if job is None:
            return None
        if args.ack:
            await client.ack(job)
        return dataclasses.asdict(job)

    return call(args, pull)


def run_stats(args: argparse.Namespace) -> int:
    return call(args, lambda client: client.stats())


def run_queues(args: argparse.Namespace) -> int:
    return call(args, lambda client: client.list_queues())


# -- cron ------------------------------------------------------------------------------------


def _cron_arguments(cron: argparse.ArgumentParser) -> None:
    cron_sub = cron.add_subparsers(dest="action", required=True)
    add = cron_sub.add_parser("add", help="create or replace a cron")
    add.add_argument("name")
    add.add_argument("queue")
    add.add_argument("schedule", help="'*/N' (every N s) or a 5/6-field cron expression")
    add.add_argument("data", nargs="?", default="null", help="the job's JSON payload")
    add.add_argument("--priority", type=int, default=0)
    cron_sub.add_parser("list", help="list crons with their next run")
    delete = cron_sub.add_parser("delete", help="delete a cron")
    delete.add_argument("name")
    for p in cron_sub.choices.values():
        client_flags(p)


def run_cron(args: argparse.Namespace) -> int:
    data = None
    if args.action == "add":
        data, valid = _json_data(args.data)
        if not valid:
            return 2

    async def run(client: AsyncClient) -> Any:
        if args.action == "add":
            await client.add_cron(args.name, args.queue, args.schedule, data, args.priority)
            return {"ok": True}
        if args.action == "delete":
            await client.delete_cron(args.name)
            return {"ok": True}
        return await client.list_crons()

    return call(args, run)


# -- queue -----------------------------------------------------------------------------------


def _queue_arguments(queue: argparse.ArgumentParser) -> None:
    queue_sub = queue.add_subparsers(dest="action", required=True)
    for action in ("pause", "resume", "dlq", "retry"):
        q = queue_sub.add_parser(action)
        q.add_argument("queue")
    limit = queue_sub.add_parser("limit", help="set or clear rate and concurrency limits")
    limit.add_argument("queue")
    limit.add_argument("--rate", type=int, default=None, help="jobs per second (0 = clear)")
    limit.add_argument("--concurrency", type=int, default=None, help="active jobs (0 = clear)")
    for p in queue_sub.choices.values():
        client_flags(p)


async def _limit(client: AsyncClient, args: argparse.Namespace) -> None:
    q = args.queue
    if args.rate is None and args.concurrency is None:
        raise ShardqError("give --rate and/or --concurrency (0 clears a limit)")
    if args.rate is not None:
        await (client.set_rate_limit(q, args.rate) if args.rate else client.clear_rate_limit(q))
    if args.concurrency is not None:
        await (client.set_concurrency(q, args.concurrency) if args.concurrency
               else client.clear_concurrency(q))


def run_queue(args: argparse.Namespace) -> int:
    async def run(client: AsyncClient) -> Any:
        q = args.queue
        if args.action == "pause":
            await client.pause(q)
        elif args.action == "resume":
            await client.resume(q)
        elif args.action == "dlq":
            return [dataclasses.asdict(job) for job in await client.dlq(q)]
        elif args.action == "retry":
            return {"retried": await client.retry_dlq(q)}
        else:
            await _limit(client, args)
        return {"ok": True}

    return call(args, run)


#: In the order ``--help`` lists them, after the server sub-commands.
CLIENT_COMMANDS = (
    SubCommand("push", "push one job", _push_arguments, run_push),
    SubCommand("pull", "pull one job and print it", _pull_arguments, run_pull),
    SubCommand("stats", "print STATS", client_flags, run_stats),
    SubCommand("queues", "list queues", client_flags, run_queues),
    SubCommand("cron", "manage crons: add, list, delete", _cron_arguments, run_cron),
    SubCommand("queue", "control a queue: pause, resume, limit, dlq, retry", _queue_arguments,
               run_queue),
)
