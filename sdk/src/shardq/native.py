"""The compiled hot path: which modules mypyc compiles, and whether they are the ones loaded.

``MODULES`` is the one list of the modules compiled to C extensions by mypyc
(``scripts/build_native.py`` builds exactly these, beside their sources). The same source
runs interpreted wherever no C compiler was found; a process picks, once, at the first
``import shardq`` (which every server package does first):

- ``SHARDQ_PURE=1`` in the environment: the sources, even where the ``.so`` files exist
  (the tests check both ways, and a user can compare);
- a build whose manifest no longer matches the sources (a module edited since the last
  build): the sources, all of them, with one line on the ``shardq.native`` logger, so an
  edit is never shadowed by an old ``.so`` (``make venv-test`` builds again);
- otherwise the compiled modules where they were built.

The choice is all or nothing: compiled modules call each other natively, so a mix of a
compiled module and an interpreted twin of its neighbour is never loaded. It is made by a
finder at the front of ``sys.meta_path`` that serves our packages' modules from their
sources only; it works alike for editable installs (``src`` folders on ``sys.path``) and
wheels. This module reads the environment when ``shardq`` is imported (the one exception to
STYLE's rule): the choice has to be made before the first compiled module loads.

Must not: import anything of shardq (it runs first), or be compiled itself.
"""

from __future__ import annotations

import importlib.machinery as machinery
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.abc import MetaPathFinder
from types import ModuleType
from typing import Any

#: The modules compiled with mypyc, one a line; ``scripts/build_native.py`` builds these and
#: nothing else. The engine and its indexes, the wire codec and command table, the node's
#: request execution and line session, the gateway's forwarding path. A module leaving a
#: package (or moving) only moves its line here.
MODULES: tuple[str, ...] = (
    # the wire: the codec, the command table, the job model, slots, line framing
    "shardq.wire.protocol",
    "shardq.wire.commands",
    "shardq.wire.job",
    "shardq.wire.slots",
    "shardq.wire.framing",
    # the engine and its indexes (pure: no I/O)
    "shardq_node.engine",
    "shardq_node.engine_config",
    "shardq_node.transitions",
    "shardq_node.jobs",
    "shardq_node.timers",
    "shardq_node.cron",
    "shardq_node.dependencies",
    "shardq_node.records",
    "shardq_node.snapshot",
    "shardq_node.slotmove",
    "shardq_node.retention",
    # the line session both servers' connections are (shardq_server)
    "shardq_server.line_session",
    # the node's request execution and line session
    "shardq_node.runtime",
    "shardq_node.commands",
    "shardq_node.cluster",
    "shardq_node.pulls",
    "shardq_node.payloads",
    "shardq_node.server_tcp",
    # what a request's group commit runs: the log, the commit gate, the latency histogram
    "shardq_node.wal",
    "shardq_node.replication",
    "shardq_server.buckets",
    # the gateway's forwarding path
    "shardq_gateway.server_tcp",
    "shardq_gateway.routes",
    "shardq_gateway.router",
    "shardq_gateway.upstream",
    "shardq_gateway.inflight",
    "shardq_gateway.subscriptions",  # its _Group subclasses inflight.Pending
)

#: The packages whose modules the finder serves from source in pure mode.
PACKAGES = frozenset({"shardq", "shardq_server", "shardq_node", "shardq_gateway"})

#: The mypyc group: one shared library (``shardq/_hotpath__mypyc.*.so``) holds the C of every
#: module above, so calls between them stay native; each module's own ``.so`` is a shim.
GROUP = "shardq._hotpath"

#: Beside the shared library, written by the build: each source's size and mtime.
MANIFEST = "_hotpath.json"

log = logging.getLogger("shardq.native")


@dataclass(frozen=True)
class Build:
    """Whether this process runs the compiled modules, and if not, why."""

    compiled: bool
    reason: str  # "" when compiled; else why the sources run

    def describe(self) -> str:
        if self.compiled:
            return f"compiled with mypyc ({len(MODULES)} modules)"
        return f"interpreted: {self.reason}"


def _here() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def _built() -> dict[str, list[Any]] | None:
    """The manifest of the last build (source path → [size, mtime_ns]), or None."""
    try:
        with open(os.path.join(_here(), MANIFEST), encoding="utf-8") as f:
            sources: dict[str, list[Any]] = json.load(f)["sources"]
    except (OSError, ValueError, KeyError):
        return None
    return sources


def _stale(sources: dict[str, list[Any]]) -> str:
    """The first source that differs from the build (its size or mtime), or ''."""
    base = os.path.dirname(_here())  # the folder that holds the shardq package
    for path, (size, mtime_ns, *_) in sources.items():
        try:
            st = os.stat(os.path.join(base, path))
        except OSError:
            return path
        if st.st_size != size or st.st_mtime_ns != mtime_ns:
            return path
    return ""


def stamp() -> str:
    """Record the installed sources' sizes and mtimes in the manifest when their bytes are
    the ones compiled (SHA-256); else remove the manifest, so the sources run. For an
    install that copied the compiled files beside freshly installed sources (the image).
    Returns what it did."""
    import hashlib

    path = os.path.join(_here(), MANIFEST)
    with open(path, encoding="utf-8") as f:
        built = json.load(f)
    base = os.path.dirname(_here())
    for rel, entry in built["sources"].items():
        full = os.path.join(base, rel)
        with open(full, "rb") as src:
            if hashlib.sha256(src.read()).hexdigest() != entry[2]:
                os.remove(path)
                return f"{rel} differs from the source compiled: the sources will run"
        st = os.stat(full)
        # an image layer (a tar) keeps whole seconds: a recorded fraction would make every
        # source look edited after the build once the layer is unpacked
        whole = st.st_mtime_ns - st.st_mtime_ns % 1_000_000_000
        if whole != st.st_mtime_ns:
            os.utime(full, ns=(st.st_atime_ns, whole))
        entry[0], entry[1] = st.st_size, whole
    with open(path, "w", encoding="utf-8") as f:
        json.dump(built, f, indent=1, sort_keys=True)
    return f"stamped {len(built['sources'])} sources: the compiled modules will run"


def _decide(environ: dict[str, str] | os._Environ[str]) -> Build:
    if environ.get("SHARDQ_PURE", "") not in ("", "0"):
        return Build(False, "SHARDQ_PURE is set")
    sources = _built()
    if sources is None:
        return Build(False, "not built (no C compiler found, or scripts/build_native.py "
                            "not run)")
    stale = _stale(sources)
    if stale:
        return Build(False, f"the build is older than {stale} (make venv-test builds again)")
    return Build(True, "")


class SourceOnly(MetaPathFinder):
    """Finds our packages' submodules in their ``.py`` files, never in a ``.so``."""

    def __init__(self) -> None:
        self._finders: dict[str, machinery.FileFinder] = {}

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> machinery.ModuleSpec | None:
        if path is None or fullname.partition(".")[0] not in PACKAGES:
            return None
        for entry in path:
            finder = self._finders.get(entry)
            if finder is None:
                finder = machinery.FileFinder(
                    entry, (machinery.SourceFileLoader, machinery.SOURCE_SUFFIXES),
                    (machinery.SourcelessFileLoader, machinery.BYTECODE_SUFFIXES))
                self._finders[entry] = finder
            spec = finder.find_spec(fullname, target)
            if spec is not None:
                return spec
        return None


def _install() -> Build:
    build = _decide(os.environ)
    if not build.compiled:
        if not any(isinstance(f, SourceOnly) for f in sys.meta_path):
            sys.meta_path.insert(0, SourceOnly())
        if build.reason.startswith("the build is older"):
            log.warning("shardq runs %s", build.describe())
    return build


#: Decided once, when ``shardq`` is first imported.
BUILD = _install()


def status() -> Build:
    """What runs in this process, read from the modules loaded (after the server's imports)."""
    if BUILD.compiled and not loaded_compiled():
        return Build(False, "no compiled module was loaded")
    return BUILD


def loaded_compiled() -> list[str]:
    """The modules of ``MODULES`` loaded in this process from a C extension."""
    return [name for name in MODULES
            if isinstance(getattr(sys.modules.get(name), "__file__", None), str)
            and _is_extension(sys.modules[name])]


def _is_extension(module: ModuleType) -> bool:
    file = module.__file__ or ""
    return file.endswith(tuple(machinery.EXTENSION_SUFFIXES))

