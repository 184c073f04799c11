"""The real-node tier's run: one real Kubernetes node, brought up once, always torn down.

Setup (each step timed, ``-s`` prints them): the Kubernetes binaries (scripts/k8s/build_kube.sh,
cached), the image (scripts/k8s/build_image.sh, the image tier's build, tagged ``IMAGE``) saved
as an OCI archive, then ``real_node.sh up`` with that archive. A lock (``WORKDIR.lock``) keeps two
sessions on one machine from sharing the node's fixed namespace and cgroup names.

Teardown runs even when a test fails: ``real_node.sh down``, then ``real_node.sh check``, whose
findings (a process, mount, namespace, cgroup or directory left behind) fail the session.

Missing root, a tool or a build is a skip on a laptop and a failure in CI (``CI=true``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .realnode import SCRIPTS, TIMINGS, RealNode, eventually, missing, timed

IMAGE = "localhost/shardq:realnode"
WORKDIR = Path(os.environ.get("SHARDQ_RN_WORK", "/var/tmp/shardq-rn"))
LOCK_WAIT = 1800  # seconds to wait for another session's node to go


def _run(what: str, argv: list[str], timeout: float, prerequisite: bool = True,
         **kw: object) -> str:
    """Run a setup step; its failure is a missing prerequisite (a build), or a failure."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          **kw)  # type: ignore[call-overload]
    if done.returncode != 0:
        why = f"{what} failed ({done.returncode}): {done.stderr[-3000:]}"
        if prerequisite:
            missing(why)
        pytest.fail(why)
    out: str = done.stdout
    return out


def _prerequisites() -> None:
    if os.geteuid() != 0:
        missing("a real node needs root (network namespace, mounts, cgroups, containerd)")
    for tool in ("ip", "nsenter", "unshare", "apt-get"):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed")


def _binaries() -> Path:
    started = time.monotonic()
    out = _run("scripts/k8s/build_kube.sh", [str(SCRIPTS / "build_kube.sh")], timeout=3600)
    timed("Kubernetes binaries (build_kube.sh)", started)
    return Path(out.strip().splitlines()[-1])


def _image_archive(into: Path) -> Path:
    started = time.monotonic()
    env = {**os.environ, "CONTAINERS_CONF": str(SCRIPTS / "containers.conf")}
    _run("scripts/k8s/build_image.sh", [str(SCRIPTS / "build_image.sh"), IMAGE], timeout=1800,
         env=env, cwd=SCRIPTS.parents[1])
    timed("image (build_image.sh)", started)
    started = time.monotonic()
    archive = into / "shardq.tar"
    for attempt in range(3):
        archive.unlink(missing_ok=True)
        _run("podman save", ["podman", "save", "--format", "oci-archive", "-o", str(archive),
                             IMAGE], timeout=600, env=env)
        if not (absent := _absent_blobs(archive)):
            break
        # seen once while another checkout rebuilt its image in the same store
        print(f"[real-node] podman save #{attempt + 1} left out blobs {absent}", flush=True)
    else:
        pytest.fail(f"podman save of {IMAGE} kept leaving out blobs: {absent}")
    timed("podman save of the image", started)
    return archive


def _absent_blobs(archive: Path) -> list[str]:
    """The digests the archive's index and manifests name but do not hold."""
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())

        def read(digest: str) -> Any:
            member = tar.extractfile(f"blobs/sha256/{digest.split(':', 1)[1]}")
            assert member is not None
            return json.load(member)

        index_file = tar.extractfile("index.json")
        assert index_file is not None
        wanted: list[str] = []
        for manifest in json.load(index_file)["manifests"]:
            wanted.append(manifest["digest"])
            if f"blobs/sha256/{manifest['digest'].split(':', 1)[1]}" in names:
                body = read(manifest["digest"])
                wanted += [d["digest"] for d in [body["config"], *body["layers"]]]
    return [d for d in wanted if f"blobs/sha256/{d.split(':', 1)[1]}" not in names]


def _lock() -> int:
    WORKDIR.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{WORKDIR}.lock", os.O_RDWR | os.O_CREAT, 0o644)

    def taken() -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    started = time.monotonic()
    eventually(f"the lock {WORKDIR}.lock (another session runs a real node)", taken, LOCK_WAIT,
               every=1.0)
    if time.monotonic() - started > 1:
        timed("waiting for another session's node", started)
    return fd


@pytest.fixture(scope="package")
def real_node() -> Iterator[RealNode]:
    """The node for the tier's whole run (package scope: torn down after tests/e2e's last test,
    not at the end of a `make test` session that has other tiers to run)."""
    _prerequisites()
    bin_dir = _binaries()
    scratch = Path(tempfile.mkdtemp(prefix="shardq-rn-image."))
    lock = -1
    try:
        archive = _image_archive(scratch)
        lock = _lock()
        started = time.monotonic()
        # local volumes for both releases: 5 claims of the unreplicated one, up to 15 of the
        # replicated one (5 shards of 3) and the claims its lost-volume test makes again
        env = {"SHARDQ_RN_PVS": "28", **os.environ, "SHARDQ_K8S_BIN": str(bin_dir)}
        out = _run("real_node.sh up", [str(SCRIPTS / "real_node.sh"), "up", str(WORKDIR),
                                        f"{IMAGE}={archive}"], timeout=900,
                   prerequisite=False, env=env)
        timed("real_node.sh up (namespace, control plane, containerd, kubelet: node Ready)",
              started)
        yield RealNode(WORKDIR, bin_dir, Path(out.strip().splitlines()[-1]))
    finally:
        try:
            if lock >= 0:
                _down()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            if lock >= 0:
                os.close(lock)
            print(f"\n[real-node] timings: {json.dumps(TIMINGS, indent=1)}", flush=True)


def _down() -> None:
    started = time.monotonic()
    down = subprocess.run([str(SCRIPTS / "real_node.sh"), "down", str(WORKDIR)],
                          capture_output=True, text=True, timeout=300, check=False)
    timed("real_node.sh down", started)
    check = subprocess.run([str(SCRIPTS / "real_node.sh"), "check", str(WORKDIR)],
                           capture_output=True, text=True, timeout=120, check=False)
    print(f"[real-node] down:\n{down.stderr.strip()}\n[real-node] leak check: "
          f"{check.stdout.strip()}", flush=True)
    assert down.returncode == 0, f"real_node.sh down failed: {down.stderr[-3000:]}"
    assert check.returncode == 0, f"the real node left things behind:\n{check.stdout}"
