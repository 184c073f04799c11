"""The real-node tier's cluster DNS: A records of Services and StatefulSet pods, from the API.

Debian ships no CoreDNS, so scripts/k8s/real_node.sh runs this instead, inside the node's network
namespace, at the address the kubelet gives pods as their nameserver. It answers what a pod of
shardq's chart asks for, the way CoreDNS's kubernetes plugin does:

- ``SVC.NS.svc.DOMAIN``: the Service's ClusterIP; a headless Service's endpoint addresses;
- ``HOST.SVC.NS.svc.DOMAIN``: the endpoint address whose hostname is HOST (a StatefulSet pod);
- a name that exists asked for another type (AAAA): no answer, NOERROR;
- anything else, inside the domain or not: NXDOMAIN (there is no upstream to forward to).

Every answer is read from the API when asked (no cache, 5 s TTL), so it follows scaling at once.
Standard library only; the control plane's ``env`` file gives the server, token and CA.

    python3 cluster_dns.py --env WORKDIR/cp/env --listen 10.244.0.1 [--port 53]

Must not: listen anywhere but the address it is given, or write anything but its log.
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import socketserver
import ssl
import struct
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

TYPE_A, TYPE_AAAA, CLASS_IN = 1, 28, 1
NOERROR, SERVFAIL, NXDOMAIN, NOTIMP = 0, 2, 3, 4
TTL = 5


class Api:
    """GETs against the apiserver with the admin token (None when the object does not exist)."""

    def __init__(self, env_file: Path) -> None:
        env = {}
        for line in env_file.read_text().splitlines():
            if line.startswith("export ") and "=" in line:
                key, value = line[len("export "):].split("=", 1)
                env[key] = shlex.split(value)[0] if value else ""
        self.server = env["SHARDQ_K8S_SERVER"]
        self.token = env["SHARDQ_K8S_TOKEN"]
        self.tls = ssl.create_default_context(cafile=env["SHARDQ_K8S_CA"])

    def get(self, path: str) -> dict[str, Any] | None:
        request = urllib.request.Request(self.server + path,
                                         headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, context=self.tls, timeout=3) as answer:
                found: dict[str, Any] = json.load(answer)
                return found
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise


def endpoint_addresses(endpoints: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [a for subset in (endpoints or {}).get("subsets") or []
            for a in subset.get("addresses") or []]


def lookup(api: Api, name: str, domain: str) -> list[str] | None:
    """The A records of ``name``; None if no such name (NXDOMAIN), [] if it has none."""
    labels = name.rstrip(".").lower().split(".")
    suffix = ["svc", *domain.split(".")]
    if labels[-len(suffix):] != suffix:
        return None
    rest = labels[:-len(suffix)]
    if len(rest) == 2:
        service, namespace = rest
        svc = api.get(f"/api/v1/namespaces/{namespace}/services/{service}")
        if svc is None:
            return None
        ip = svc["spec"].get("clusterIP")
        if ip and ip != "None":
            return [ip]
        eps = api.get(f"/api/v1/namespaces/{namespace}/endpoints/{service}")
        return [a["ip"] for a in endpoint_addresses(eps)]
    if len(rest) == 3:
        host, service, namespace = rest
        eps = api.get(f"/api/v1/namespaces/{namespace}/endpoints/{service}")
        ips = [a["ip"] for a in endpoint_addresses(eps) if a.get("hostname") == host]
        return ips or None
    return None


def parse_question(packet: bytes) -> tuple[int, int, str, int, int, bytes]:
    """(id, flags, name, qtype, qclass, the question's bytes) of a one-question query."""
    tid, flags, qdcount = struct.unpack("!HHH", packet[:6])
    if qdcount != 1:
        raise ValueError(f"{qdcount} questions")
    labels, i = [], 12
    while packet[i]:
        length = packet[i]
        if length & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(packet[i + 1:i + 1 + length].decode("ascii"))
        i += 1 + length
    qtype, qclass = struct.unpack("!HH", packet[i + 1:i + 5])
    return tid, flags, ".".join(labels), qtype, qclass, packet[12:i + 5]


def reply(tid: int, flags: int, question: bytes, rcode: int, ips: list[str]) -> bytes:
    # QR, the query's opcode and RD, AA (we are the authority for the cluster domain)
    out_flags = 0x8000 | (flags & 0x7900) | 0x0400 | rcode
    answers = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", TYPE_A, CLASS_IN, TTL, 4)
                       + socket.inet_aton(ip) for ip in ips)
    return struct.pack("!HHHHHH", tid, out_flags, 1, len(ips), 0, 0) + question + answers


def answer(api: Api, domain: str, packet: bytes) -> bytes | None:
    try:
        tid, flags, name, qtype, qclass, question = parse_question(packet)
    except (ValueError, IndexError, struct.error, UnicodeDecodeError):
        return None  # not a query we can even echo: drop it
    if flags & 0x7800:  # an opcode other than QUERY
        return reply(tid, flags, question, NOTIMP, [])
    try:
        ips = lookup(api, name, domain) if qclass == CLASS_IN else None
    except (OSError, ValueError, KeyError) as exc:
        print(f"cluster_dns: {name}: {exc!r}", file=sys.stderr, flush=True)
        return reply(tid, flags, question, SERVFAIL, [])
    if ips is None:
        return reply(tid, flags, question, NXDOMAIN, [])
    return reply(tid, flags, question, NOERROR, ips if qtype == TYPE_A else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--env", type=Path, required=True,
                        help="the control plane's env file (server, token, CA)")
    parser.add_argument("--listen", required=True, help="address to answer on (UDP)")
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--domain", default="cluster.local")
    args = parser.parse_args()
    api = Api(args.env)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            packet, sock = self.request
            out = answer(api, args.domain, packet)
            if out is not None:
                sock.sendto(out, self.client_address)

    with socketserver.ThreadingUDPServer((args.listen, args.port), Handler) as server:
        server.daemon_threads = True
        print(f"cluster_dns: answering for {args.domain} on {args.listen}:{args.port}",
              file=sys.stderr, flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
