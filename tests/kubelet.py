"""A test kubelet: runs a namespace's unscheduled Pods as local processes on loopback.

The end-to-end control plane (scripts/k8s/control_plane.sh) has no scheduler and
no kubelet, so Pods stay Pending. ``Kubelet`` watches the Pods of one namespace
and, for each one bound to no node, does what a kubelet would, with a local
process standing for the container:

- gives the pod its own loopback address ``127.0.0.x`` (never reused);
- runs the first container's ``command + args`` (the image is ignored: the command's
  program is looked up in ``bin_dir``, the test's virtualenv, so the local ``shardq``
  CLI stands for the image and the manifests' own command line is what runs) with the
  container's env (``value``, ``valueFrom`` ``fieldRef`` of the pod's metadata and
  status, ``secretKeyRef`` and ``configMapKeyRef`` read from the API; ``$(VAR)``
  expanded in env values, command and args as Kubernetes does); ``--host 0.0.0.0``
  becomes the pod's address, and every volume mount path in the args becomes a directory
  under ``workdir/volumes`` named after the PersistentVolumeClaim and its uid (a pod
  recreated with the same claim finds its data; a claim deleted and made again is a new,
  empty volume) or, for other volumes, after the pod; a pod whose claim is missing or
  being deleted stays Pending, as the scheduler leaves it;
- patches the pod's status: ``Running``, ``podIP``, ``hostIP``, container
  status, and the ``Ready`` condition from the container's ``readinessProbe``
  (``httpGet`` on the pod's address), probed again every ``probe_every``
  seconds, so Endpoints and the controllers' ready counts are real;
- restarts a process that exits (``restartPolicy: Always``, restartCount + 1);
- leaves Pending the pods ``should_run(pod)`` refuses;
- stops the process of a deleted pod: ``on_delete(run)`` first (a test hook),
  then SIGTERM to its PID, SIGKILL after the grace period.

Everything runs in two threads (watch, probe) with their own API clients.
Only processes it started are signalled, always by PID.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime
import http.client
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("tests.kubelet")

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)|\$\$")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known names are replaced, ``$$`` is ``$``."""
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR.sub(one, text)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _die_with_parent() -> None:  # in the child, between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ClaimUnusable(Exception):
    """A pod's PersistentVolumeClaim is being deleted: no volume to give it."""


@dataclass
class PodRun:
    """One pod this kubelet runs."""

    name: str
    uid: str
    ip: str
    labels: dict[str, str]
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    grace: float
    probe: tuple[str, int] | None  # readiness httpGet (path, port)
    container: str
    image: str
    proc: subprocess.Popen[bytes] | None = None
    started_at: str = ""
    restarts: int = 0
    ready: bool | None = None
    deleted: bool = False
    exits: list[int] = field(default_factory=list)
    next_restart: float = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class Kubelet:
    def __init__(self, kubeconfig: str, namespace: str, workdir: Path, bin_dir: str,
                 on_delete: Callable[[PodRun], None] | None = None,
                 should_run: Callable[[Any], bool] | None = None,
                 probe_every: float = 0.5, max_grace: float = 10.0) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.workdir = workdir
        self.bin_dir = bin_dir
        self.on_delete = on_delete
        self.should_run = should_run
        self.probe_every = probe_every
        self.max_grace = max_grace
        self.runs: dict[str, PodRun] = {}  # by pod uid: the live ones
        self.stopping: dict[str, PodRun] = {}  # by pod uid: deleted, process not yet stopped
        self.stopped: list[PodRun] = []  # pods whose process this kubelet stopped
        self.errors: list[str] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._next_ip = 10
        self._threads: list[threading.Thread] = []
        self._watch: watch.Watch | None = None
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        (workdir / "volumes").mkdir(parents=True, exist_ok=True)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Kubelet:
        for target, name in ((self._watch_loop, "kubelet-watch"),
                             (self._probe_loop, "kubelet-probe")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Stop watching and stop every process still running."""
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        for t in self._threads:
            t.join(20)
        with self._lock:
            runs = list(self.runs.values())
            self.runs.clear()
        for run in runs:
            self._kill(run)

    def _api(self) -> client.ApiClient:
        api: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=self.kubeconfig)
        return api

    def live(self, prefix: str = "") -> list[PodRun]:
        """The pods whose process runs and which are not deleted."""
        with self._lock:
            return [r for r in self.runs.values() if r.name.startswith(prefix)]

    def by_name(self, name: str) -> PodRun | None:
        with self._lock:
            for r in self.runs.values():
                if r.name == name:
                    return r
        return None

    # -- watching -----------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        with self._api() as api:
            core = client.CoreV1Api(api)
            while not self._stop.is_set():
                try:
                    listed = core.list_namespaced_pod(self.namespace)
                    present = {p.metadata.uid for p in listed.items}
                    with self._lock:
                        gone = [r for uid, r in self.runs.items() if uid not in present]
                    for run in gone:
                        self._delete(run)
                    for pod in listed.items:
                        self._pod_event(core, pod)
                    self._watch = watch.Watch()  # type: ignore[no-untyped-call]
                    for event in self._watch.stream(
                            core.list_namespaced_pod, self.namespace,
                            resource_version=listed.metadata.resource_version,
                            timeout_seconds=5):  # (stop() waits for the stream to end)
                        if self._stop.is_set():
                            break
                        pod = event["object"]
                        if event["type"] == "DELETED":
                            run = self._run_of(pod.metadata.uid)
                            if run is not None:
                                self._delete(run)
                        elif event["type"] in ("ADDED", "MODIFIED"):
                            self._pod_event(core, pod)
                except ApiException as exc:
                    # 410: the resourceVersion is too old: list again
                    if exc.status != 410 and not self._stop.is_set():
                        self._error(f"watch: {exc.status} {exc.reason}")
                        self._stop.wait(0.5)
                except Exception as exc:  # keep watching; the test sees self.errors
                    if not self._stop.is_set():
                        self._error(f"watch: {exc!r}")
                        self._stop.wait(0.5)

    def _run_of(self, uid: str) -> PodRun | None:
        with self._lock:
            return self.runs.get(uid)

    def _error(self, text: str) -> None:
        log.error("%s", text)
        self.errors.append(text)

    def _pod_event(self, core: client.CoreV1Api, pod: Any) -> None:
        run = self._run_of(pod.metadata.uid)
        if pod.metadata.deletion_timestamp is not None:
            if run is not None:
                self._delete(run)
                # confirm the stop, as a kubelet does; only this pod: the StatefulSet may
                # have made a new one of the same name already
                with contextlib.suppress(ApiException):
                    core.delete_namespaced_pod(
                        pod.metadata.name, self.namespace, body=client.V1DeleteOptions(
                            grace_period_seconds=0,
                            preconditions=client.V1Preconditions(uid=pod.metadata.uid)))
            return
        if run is not None or pod.spec.node_name:
            return
        if self.should_run is not None and not self.should_run(pod):
            return  # left Pending, like a pod no node can take
        if pod.status is not None and pod.status.phase not in (None, "Pending"):
            return  # ran before (by an earlier kubelet): never again, as a real one would
        try:
            run = self._prepare(core, pod)
            self._spawn(run)  # before the prober can see it: it restarts runs without a process
        except ClaimUnusable as exc:
            log.warning("pod %s stays Pending: %s", pod.metadata.name, exc)
            return
        except ApiException as exc:
            if exc.status == 404:  # its claim is gone: Pending, as the scheduler leaves it
                log.warning("pod %s stays Pending: its claim is missing", pod.metadata.name)
                return
            self._error(f"cannot run pod {pod.metadata.name}: {exc!r}")
            return
        except Exception as exc:
            self._error(f"cannot run pod {pod.metadata.name}: {exc!r}")
            return
        with self._lock:
            self.runs[run.uid] = run
        self._report(core, run)

    # -- starting -----------------------------------------------------------------------------

    def _address(self) -> str:
        with self._lock:
            while self._next_ip < 255:
                ip = f"127.0.0.{self._next_ip}"
                self._next_ip += 1
                if _free(ip):
                    return ip
        raise RuntimeError("no loopback address left for a pod")

    def _prepare(self, core: client.CoreV1Api, pod: Any) -> PodRun:
        meta, spec = pod.metadata, pod.spec
        c = spec.containers[0]
        ip = self._address()
        env: dict[str, str] = {}
        for var in c.env or []:
            value = self._env_value(core, pod, ip, var, env)
            if value is not None:
                env[var.name] = value
        command = [expand(a, env) for a in (c.command or [])]
        args = [expand(a, env) for a in (c.args or [])]
        if not command:
            raise RuntimeError("the container has no command (the image's is unknown here)")
        program = shutil.which(command[0], path=self.bin_dir)
        if program is None:
            raise RuntimeError(f"{command[0]} is not in {self.bin_dir}")
        argv = [program, *command[1:], *args]
        for i in range(len(argv) - 1):
            if argv[i] == "--host" and argv[i + 1] == "0.0.0.0":
                argv[i + 1] = ip
        mounts = self._mounts(core, pod, c)
        for i, arg in enumerate(argv[1:], 1):  # the program itself is the host's, never moved
            for path, local in mounts.items():
                if arg == path or arg.startswith(path.rstrip("/") + "/"):
                    argv[i] = str(local) + arg[len(path.rstrip("/")):]
        probe = None
        rp = c.readiness_probe
        if rp is not None and rp.http_get is not None:
            port = rp.http_get.port
            if isinstance(port, str) and not port.isdigit():
                named = {p.name: p.container_port for p in c.ports or []}
                port = named[port]
            probe = (rp.http_get.path or "/", int(port))
        grace = min(float(spec.termination_grace_period_seconds or 30), self.max_grace)
        return PodRun(name=meta.name, uid=meta.uid, ip=ip, labels=dict(meta.labels or {}),
                      argv=argv, env=env,
                      log_path=self.workdir / "logs" / f"{meta.name}-{meta.uid[:8]}.log",
                      grace=grace, probe=probe, container=c.name, image=c.image)

    def _env_value(self, core: client.CoreV1Api, pod: Any, ip: str, var: Any,
                   env: dict[str, str]) -> str | None:
        if var.value_from is None:
            return expand(var.value or "", env)
        src = var.value_from
        if src.field_ref is not None:
            fields = {"metadata.name": pod.metadata.name,
                      "metadata.namespace": pod.metadata.namespace,
                      "metadata.uid": pod.metadata.uid,
                      "status.podIP": ip, "status.hostIP": "127.0.0.1",
                      "spec.nodeName": "test-kubelet"}
            path = src.field_ref.field_path
            if path not in fields:
                raise RuntimeError(f"fieldRef {path} is not supported")
            return fields[path]
        if src.config_map_key_ref is not None:
            ref = src.config_map_key_ref
            cm = _read_optional(core.read_namespaced_config_map, ref.name, self.namespace,
                                ref.optional)
            if cm is None:
                return None
            value = (cm.data or {}).get(ref.key)
            if value is None and not ref.optional:
                raise RuntimeError(f"configmap {ref.name} has no key {ref.key}")
            return value
        if src.secret_key_ref is not None:
            ref = src.secret_key_ref
            secret = _read_optional(core.read_namespaced_secret, ref.name, self.namespace,
                                    ref.optional)
            if secret is None:
                return None
            raw = (secret.data or {}).get(ref.key)
            if raw is None:
                if ref.optional:
                    return None
                raise RuntimeError(f"secret {ref.name} has no key {ref.key}")
            return base64.b64decode(raw).decode()
        if src.config_map_key_ref is not None:
            ref = src.config_map_key_ref
            cm = core.read_namespaced_config_map(ref.name, self.namespace)
            value = (cm.data or {}).get(ref.key)
            if value is None and not ref.optional:
                raise RuntimeError(f"config map {ref.name} has no key {ref.key}")
            return value
        raise RuntimeError(f"env {var.name}: unsupported valueFrom")

    def _mounts(self, core: client.CoreV1Api, pod: Any, c: Any) -> dict[str, Path]:
        claims = {}
        for v in pod.spec.volumes or []:
            if v.persistent_volume_claim is not None:
                name = v.persistent_volume_claim.claim_name
                found = core.read_namespaced_persistent_volume_claim(name, self.namespace)
                if found.metadata.deletion_timestamp is not None:
                    raise ClaimUnusable(f"persistentvolumeclaim {name} is being deleted")
                claims[v.name] = f"{name}-{found.metadata.uid[:8]}"
        out = {}
        for m in c.volume_mounts or []:
            claim = claims.get(m.name)
            local = (self.workdir / "volumes" / claim if claim
                     else self.workdir / "volumes" / f"{pod.metadata.name}-{m.name}")
            local.mkdir(parents=True, exist_ok=True)
            out[m.mount_path] = local
        return out

    def _spawn(self, run: PodRun) -> None:
        process_env = {"PATH": f"{self.bin_dir}:{os.defpath}", "HOME": str(self.workdir),
                       "LANG": "C.UTF-8", **run.env}
        with open(run.log_path, "ab") as out:
            out.write(f"--- {_now()} start {run.argv}\n".encode())
            out.flush()
            run.proc = subprocess.Popen(run.argv, env=process_env, stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        cwd=self.workdir, start_new_session=True,
                                        preexec_fn=_die_with_parent)
        run.started_at = _now()
        run.ready = None
        log.info("pod %s: pid %d on %s: %s", run.name, run.proc.pid, run.ip, " ".join(run.argv))

    # -- status -------------------------------------------------------------------------------

    def _report(self, core: client.CoreV1Api, run: PodRun, ready: bool = False) -> None:
        now = _now()
        ready_text = "True" if ready else "False"
        status = {
            "phase": "Running", "podIP": run.ip, "podIPs": [{"ip": run.ip}],
            "hostIP": "127.0.0.1", "startTime": run.started_at,
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": ready_text, "lastTransitionTime": now},
                {"type": "Ready", "status": ready_text, "lastTransitionTime": now},
            ],
            "containerStatuses": [{
                "name": run.container, "image": run.image, "imageID": "",
                "containerID": f"local://{run.pid}", "ready": ready, "started": True,
                "restartCount": run.restarts,
                "state": {"running": {"startedAt": run.started_at}},
            }],
        }
        try:  # the uid makes it a precondition: never the status of a namesake
            core.patch_namespaced_pod_status(run.name, self.namespace, {
                "metadata": {"uid": run.uid}, "status": status})
        except ApiException as exc:
            namesake = exc.status == 422 and "metadata.uid" in str(exc.body)
            if exc.status != 404 and not namesake:  # (deleted meanwhile)
                self._error(f"status of {run.name}: {exc.status} {exc.reason}")

    def _probe_loop(self) -> None:
        with self._api() as api:
            core = client.CoreV1Api(api)
            while not self._stop.wait(self.probe_every):
                with self._lock:
                    runs = [r for r in self.runs.values() if not r.deleted]
                for run in runs:
                    try:
                        self._check(core, run)
                    except Exception as exc:
                        self._error(f"probe of {run.name}: {exc!r}")

    def _check(self, core: client.CoreV1Api, run: PodRun) -> None:
        proc = run.proc
        if proc is not None and proc.poll() is not None:
            with self._lock:
                if run.deleted:
                    return
                run.exits.append(proc.returncode)
                run.proc = None
                run.next_restart = time.monotonic() + min(2.0 ** len(run.exits) / 4, 5.0)
            log.warning("pod %s: exited with %s", run.name, proc.returncode)
            self._report(core, run, ready=False)
            return
        if run.proc is None:
            if time.monotonic() >= run.next_restart:
                with self._lock:
                    if run.deleted:
                        return
                    run.restarts += 1
                    self._spawn(run)
                self._report(core, run, ready=False)
            return
        ready = _http_ok(run.ip, run.probe) if run.probe is not None else True
        if ready != run.ready:
            run.ready = ready
            self._report(core, run, ready=ready)

    # -- stopping -----------------------------------------------------------------------------

    def _delete(self, run: PodRun) -> None:
        with self._lock:
            if run.deleted:
                return
            run.deleted = True
            self.runs.pop(run.uid, None)
            self.stopping[run.uid] = run
        try:
            if self.on_delete is not None:
                try:
                    self.on_delete(run)
                except Exception as exc:
                    self._error(f"on_delete of {run.name}: {exc!r}")
            self._kill(run)
        finally:
            with self._lock:
                self.stopping.pop(run.uid, None)

    def idle(self) -> bool:
        """No process runs: every pod's process is stopped (or was never started)."""
        with self._lock:
            return not self.runs and not self.stopping

    def _kill(self, run: PodRun) -> None:
        run.deleted = True
        proc = run.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(run.grace)
            except subprocess.TimeoutExpired:
                log.warning("pod %s: pid %d ignored SIGTERM for %.0fs: SIGKILL",
                            run.name, proc.pid, run.grace)
                proc.kill()
                proc.wait(10)
        if proc is not None:
            run.exits.append(proc.returncode)
        with self._lock:
            self.stopped.append(run)
        log.info("pod %s: stopped (exit %s)", run.name, proc.returncode if proc else None)


def _free(ip: str) -> bool:
    """Nothing listens on ``ip`` (ports 6789 and 6790, shardq's)."""
    for port in (6789, 6790):
        with socket.socket() as s:
            try:
                s.bind((ip, port))
            except OSError:
                return False
    return True


def _http_ok(ip: str, probe: tuple[str, int]) -> bool:
    path, port = probe
    conn = http.client.HTTPConnection(ip, port, timeout=1.0)
    try:
        conn.request("GET", path)
        return 200 <= conn.getresponse().status < 400
    except OSError:
        return False
    finally:
        conn.close()


def _read_optional(read: Any, name: str, namespace: str, optional: bool | None) -> Any:
    """``read(name, namespace)``; None when the object is missing and the reference is
    optional (a required one missing raises, as the kubelet fails such a pod)."""
    try:
        return read(name, namespace)
    except ApiException as exc:
        if exc.status == 404 and optional:
            return None
        raise
