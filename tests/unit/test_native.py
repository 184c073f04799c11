"""The compiled hot path (shardq.native): which modules a process loads, and what it reports.

Each case runs a fresh interpreter (the choice is made once, at the first ``import shardq``)
the way a server runs: the editable install's ``src`` folders on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardq import native

from ..helpers import eventually_sync, free_port, require, start_node_process

#: prints, for each compiled module, the file it was loaded from, then the build's verdict
PROBE = """
import importlib, json, sys
import shardq.native as native
files = {name: importlib.import_module(name).__file__ for name in native.MODULES}
print(json.dumps({"files": files, "compiled": native.status().compiled,
                  "describe": native.status().describe()}))
"""


def probe(**env: str) -> dict[str, object]:
    environ = {k: v for k, v in os.environ.items() if k != "SHARDQ_PURE"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**environ, **env}, check=True,
                         capture_output=True, text=True, timeout=60)
    result: dict[str, object] = json.loads(out.stdout)
    return result


def built() -> bool:
    return native._decide({}).compiled


def test_every_listed_module_exists_as_a_source() -> None:
    for name in native.MODULES:
        assert name.partition(".")[0] in native.PACKAGES
        __import__(name)
        assert sys.modules[name].__file__ is not None


def test_shardq_pure_loads_every_module_from_its_source_even_when_built() -> None:
    result = probe(SHARDQ_PURE="1")
    files = result["files"]
    assert isinstance(files, dict)
    assert all(path.endswith(".py") for path in files.values()), files
    assert result["compiled"] is False
    assert result["describe"] == "interpreted: SHARDQ_PURE is set"


def test_a_built_tree_loads_every_listed_module_compiled() -> None:
    require(built(), "the hot path is not built (scripts/build_native.py needs a C compiler)")
    result = probe()
    files = result["files"]
    assert isinstance(files, dict)
    assert all(path.endswith(".so") for path in files.values()), files
    assert result["compiled"] is True


def test_a_source_edited_after_the_build_is_run_from_source() -> None:
    sources = {"shardq/wire/protocol.py": [1, 1]}  # the size and mtime of another file
    assert native._stale(sources) == "shardq/wire/protocol.py"
    here = os.path.join(os.path.dirname(native.__file__), "wire", "protocol.py")
    st = os.stat(here)
    assert native._stale({"shardq/wire/protocol.py": [st.st_size, st.st_mtime_ns]}) == ""


@pytest.mark.parametrize("value, pure", [("1", True), ("0", False), ("", False)])
def test_only_a_set_shardq_pure_forces_the_sources(value: str, pure: bool) -> None:
    decided = native._decide({"SHARDQ_PURE": value})
    assert (decided.reason == "SHARDQ_PURE is set") is pure


def test_a_node_says_once_at_start_that_it_runs_interpreted(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    with open(log, "wb") as out:
        proc = start_node_process(free_port(), "--log-level", "INFO",
                                  env={"SHARDQ_PURE": "1"}, log=out)
    try:
        eventually_sync(lambda: "runs interpreted: SHARDQ_PURE is set" in log.read_text(), 15,
                        what="the node's line about its build")
    finally:
        proc.terminate()
        proc.wait(20)
    assert log.read_text().count("runs interpreted") == 1


def test_a_stamped_install_stays_compiled_when_a_layer_keeps_whole_seconds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The image copies the compiled files beside freshly installed sources and stamps them;
    the layer then stores mtimes in whole seconds. Before, the stamp kept the fraction, so
    every image ran interpreted ("the build is older than shardq/wire/commands.py")."""
    import hashlib

    package = tmp_path / "shardq"
    (package / "wire").mkdir(parents=True)
    source = package / "wire" / "commands.py"
    source.write_bytes(b"X = 1\n")
    os.utime(source, ns=(1_796_617_479_249_789_174, 1_796_617_479_249_789_174))
    manifest = {"sources": {"shardq/wire/commands.py": [
        0, 0, hashlib.sha256(source.read_bytes()).hexdigest()]}}
    (package / native.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setattr(native, "_here", lambda: str(package))
    assert native.stamp().startswith("stamped 1 sources")
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns // 10**9 * 10**9))  # what a tar keeps
    sources = native._built()
    assert sources is not None and native._stale(sources) == ""
    source.write_bytes(b"X = 2\n")  # an edit is still seen
    assert native._stale(sources) == "shardq/wire/commands.py"
