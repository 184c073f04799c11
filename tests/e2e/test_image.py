"""The image tier: the Dockerfile, built offline by scripts/k8s/build_image.sh, run with podman.

The build runs `podman build --pull=never --network=none` on the cached `python:3.11-slim`
(scripts/k8s/base_image.sh) and wheels made on the host; the containers run with
`--network=none` as the image's own user. A node inside answers STATS over TCP and the image's
HEALTHCHECK command over HTTP, with its write-ahead log on the /data volume.

Cold (no wheels, no layers; the base image cached) this tier takes about 36 s, cached 7-16 s.
No podman (or no root for podman's store) is a skip on a laptop and a failure in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import missing

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "scripts" / "k8s" / "build_image.sh"
TAG = "localhost/shardq:test"
UID = 10001
#: the cached base, our layers, and a little room: a guard against a dependency ballooning
MAX_SIZE = 400 * 1000 * 1000

pytestmark = pytest.mark.timeout(900)  # a cold base image (debootstrap) takes ~70 s more

#: Runs inside the container, where tests/ (and its eventually()) is not installed: its loop is
#: the same bounded wait for the node's port, written out.
STATS_CLIENT = """
import json, socket, time
deadline = time.monotonic() + 20
while True:
    try:
        s = socket.create_connection(("127.0.0.1", 6789), timeout=2)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)  # a wait for the port, in the container: eventually() is not there
s.sendall(b'{"cmd": "STATS"}\\n')
print("STATS", s.makefile().readline().strip(), flush=True)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(ROOT / "scripts" / "k8s" / "containers.conf")}


def _need_podman() -> None:
    why = None
    if shutil.which("podman") is None:
        why = "podman is not installed (apt-get install podman buildah runc …; see .ci/run)"
    elif os.geteuid() != 0:
        why = "podman's root image store (and debootstrap for the base image) need root"
    if why:
        missing(why)


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                          env=_env())


def build() -> tuple[str, float]:
    """Build the image; (its id, seconds it took)."""
    t0 = time.monotonic()
    done = subprocess.run([str(BUILD), TAG], capture_output=True, text=True, timeout=1800,
                          env=_env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip() == TAG
    return image_id(), time.monotonic() - t0


def image_id() -> str:
    done = podman("image", "inspect", "--format", "{{.Id}}", TAG)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


#: the operator's pod security context, as podman flags: read-only root, a tmpfs /tmp, no
#: capabilities, no privilege escalation (shardq_operator.reconcile builds the same for Kubernetes)
HARDENED = ["--read-only", "--tmpfs=/tmp", "--cap-drop=ALL", "--security-opt=no-new-privileges"]


def run(script: str, *args: str, env: dict[str, str] | None = None,
        timeout: float = 120, hardened: bool = False) -> subprocess.CompletedProcess[str]:
    """``sh -c script`` in a throwaway container of the image, offline, as the image's user."""
    flags = [f"--env={k}={v}" for k, v in (env or {}).items()] + (HARDENED if hardened else [])
    return podman("run", "--rm", "--network=none", *flags, "--entrypoint", "sh", TAG,
                  "-c", script, "sh", *args, timeout=timeout)


def healthcheck(image: dict[str, Any]) -> list[str]:
    """The HEALTHCHECK's test (podman shows it beside Config; docker inside)."""
    check = image.get("Healthcheck") or image["Config"].get("Healthcheck")
    assert check, "no HEALTHCHECK: was the image built in OCI format (no --format docker)?"
    test: list[str] = check["Test"]
    return test


@pytest.fixture(scope="module")
def image() -> dict[str, Any]:
    _need_podman()
    build()
    done = podman("image", "inspect", TAG)
    assert done.returncode == 0, done.stderr
    info: dict[str, Any] = json.loads(done.stdout)[0]
    return info


def test_dockerfile_builds_from_the_unmodified_python_base_in_two_stages() -> None:
    froms = [line.split()[1:] for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.startswith("FROM ")]
    assert froms == [["python:3.11-slim", "AS", "deps"], ["python:3.11-slim"]]
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore, "the build context is the wheels only"


def test_image_runs_shardq_as_uid_10001_with_the_role_as_command(image: dict[str, Any]) -> None:
    config = image["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["shardq"]
    assert config["Cmd"] == ["node"]
    assert set(config["ExposedPorts"]) == {"6789/tcp", "6790/tcp"}
    assert set(config["Volumes"]) == {"/data"}
    assert healthcheck(image)[0] == "CMD"
    assert image["Size"] < MAX_SIZE, f"image is {image['Size'] / 1e6:.0f} MB"


def test_node_in_the_image_answers_stats_and_the_healthcheck(image: dict[str, Any]) -> None:
    """Run as the operator runs it: read-only root, no capabilities; the node writes only /data."""
    health = healthcheck(image)[1:]
    script = """
        set -e
        echo "UID $(id -u)"
        echo "ROOTFS $(awk '$2 == "/" {split($4, o, ","); print o[1]}' /proc/mounts)"
        shardq node --port 6789 --http-port 6790 >/tmp/node.log 2>&1 &
        python3 -c "$STATS_CLIENT"
        # the HEALTHCHECK until it passes (bounded: ten tries; no eventually() in the image)
        for _ in 1 2 3 4 5 6 7 8 9 10; do "$@" && { echo HEALTHY; break; }; sleep 0.3; done
        echo "DATA $(stat -c %u /data) $(find /data -type f | wc -l)"
        kill $!
    """
    done = run(script, *health, env={"STATS_CLIENT": STATS_CLIENT}, hardened=True)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines["UID"] == str(UID)
    assert lines["ROOTFS"] == "ro", "the node needs no writable root filesystem"
    stats = json.loads(lines["STATS"])
    assert stats["ok"] is True
    assert "HEALTHY" in done.stdout
    owner, files = lines["DATA"].split()
    assert owner == str(UID) and int(files) > 0, "the node keeps its WAL on the /data volume"


def test_every_role_is_installed_and_no_compiler_is(image: dict[str, Any]) -> None:
    script = """
        for tool in gcc cc c++ make; do command -v $tool && exit 1; done
        python3 -c "import shardq_node.main, shardq_gateway.main, shardq_operator.handlers"
        shardq gateway --help >/dev/null
        shardq operator --help >/dev/null
        echo ROLES OK
    """
    done = run(script)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ROLES OK" in done.stdout


def test_building_again_reuses_every_cached_layer(image: dict[str, Any]) -> None:
    before = image_id()
    after, seconds = build()
    assert after == before
    assert seconds < 60, f"a cached build took {seconds:.0f} s"
