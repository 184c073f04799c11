"""Compile the hot path (``shardq.native.MODULES``) with mypyc, in place beside the sources.

    python scripts/build_native.py            # build when a source changed since the last build
    python scripts/build_native.py --force    # build again
    python scripts/build_native.py --clean    # remove every compiled file: the sources run
    python scripts/build_native.py --into DIR # and copy them to DIR, laid out like site-packages

Run by scripts/bootstrap.sh (so by ``make run`` and ``make test``) and by the image's build
stage. Where no C compiler (or no Python headers) is found it says so, removes any old build
and exits 0: the same sources run interpreted. The ``.so`` files land beside their ``.py``
in ``<dist>/src/…`` (ignored by git); one shared library, ``shardq/_hotpath__mypyc*.so``,
holds the C of every module, and ``shardq/_hotpath.json`` records the size and mtime of
each source it was built from (``shardq.native`` loads the sources when they differ).
The C files and objects go to ``build/mypyc``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = {  # top-level package → the folder that holds it
    "shardq": "sdk/src",
    "shardq_server": "server/src",
    "shardq_node": "node/src",
    "shardq_gateway": "gateway/src",
}
NATIVE = os.path.join(ROOT, "sdk/src/shardq/native.py")
BUILD_DIR = os.path.join(ROOT, "build/mypyc")


def _native() -> dict[str, object]:
    # read as a file: importing shardq would load the compiled modules this build replaces
    return runpy.run_path(NATIVE, run_name="shardq_native_for_build")


def source_of(module: str) -> str:
    top, _, rest = module.partition(".")
    return os.path.join(SRC[top], top, *rest.split(".")) + ".py" if rest else ""


def compiler_missing() -> str:
    """Why no extension can be built here, or ''."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc}) found"
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        return f"no Python headers ({include}/Python.h)"
    try:
        import mypyc  # noqa: F401  (the build tool, from the test extra or the image's stage)
    except ImportError:
        return "mypyc is not installed"
    return ""


def compiled_files() -> list[str]:
    found: list[str] = []
    for src in SRC.values():
        found += glob.glob(os.path.join(ROOT, src, "**", "*.so"), recursive=True)
    found += glob.glob(os.path.join(ROOT, SRC["shardq"], "shardq", "_hotpath.json"))
    return sorted(found)


def clean() -> None:
    for path in compiled_files():
        os.remove(path)


def fingerprint(modules: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    h.update(sys.version.encode())
    import mypy.version
    h.update(mypy.version.__version__.encode())
    for path in (*map(source_of, modules), "scripts/build_native.py"):
        h.update(path.encode())
        with open(os.path.join(ROOT, path), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:20]


def manifest(modules: tuple[str, ...], key: str, relative: bool = True) -> dict[str, object]:
    """Each source's size, mtime and SHA-256, by its path from the folder holding ``shardq``
    (``relative``) or by its path in a site-packages folder."""
    base = os.path.join(ROOT, SRC["shardq"])
    sources = {}
    for name in modules:
        full = os.path.join(ROOT, source_of(name))
        st = os.stat(full)
        with open(full, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        path = os.path.relpath(full, base) if relative else source_of(name).split("/", 2)[2]
        sources[path] = [st.st_size, st.st_mtime_ns, digest]
    return {"key": key, "sources": sources}


def write_manifest(modules: tuple[str, ...], group: str, key: str) -> None:
    out = os.path.join(ROOT, SRC["shardq"], *group.split(".")[:-1], "_hotpath.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(manifest(modules, key), f, indent=1, sort_keys=True)


def copy_into(target: str, modules: tuple[str, ...], group: str, key: str) -> None:
    """The compiled files, laid out as in site-packages, with a manifest that
    ``shardq.native.stamp()`` completes once the sources are installed beside them
    (the image's build stage)."""
    os.makedirs(target, exist_ok=True)
    for path in compiled_files():
        if path.endswith(".so"):
            rel = os.path.relpath(path, ROOT).split("/", 2)[2]  # <dist>/src/<rel>
            os.makedirs(os.path.join(target, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(path, os.path.join(target, rel))
    out = os.path.join(target, *group.split(".")[:-1], "_hotpath.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(manifest(modules, key, relative=False), f, indent=1, sort_keys=True)


def built_key() -> str:
    try:
        with open(os.path.join(ROOT, SRC["shardq"], "shardq", "_hotpath.json")) as f:
            key: str = json.load(f)["key"]
            return key
    except (OSError, ValueError, KeyError):
        return ""


def build(modules: tuple[str, ...], group: str, jobs: int) -> None:
    """mypycify in a child process (setuptools' build_ext --inplace)."""
    paths = [source_of(m) for m in modules]
    package_dir = {top: os.path.join(src, top) for top, src in SRC.items()}
    code = f"""
import sys
from setuptools import setup
from mypyc.build import mypycify
setup(name="shardq-native", script_name="build_native",
      script_args=["build_ext", "--inplace", "--parallel", "{jobs}",
                   "--build-temp", "build/mypyc/temp"],
      package_dir={package_dir!r},
      ext_modules=mypycify({paths!r}, group_name={group!r}, target_dir="build/mypyc",
                           opt_level="3", debug_level="0"))
"""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="build even if nothing changed")
    ap.add_argument("--clean", action="store_true", help="remove the compiled files")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--into", metavar="DIR",
                    help="also copy the compiled files to DIR (emptied first)")
    args = ap.parse_args()
    if args.into:
        shutil.rmtree(args.into, ignore_errors=True)
        os.makedirs(args.into)
    if args.clean:
        clean()
        return 0
    why = compiler_missing()
    if why:
        clean()
        print(f"build_native: {why}: shardq runs interpreted (the same sources)",
              file=sys.stderr)
        return 0
    native = _native()
    modules: tuple[str, ...] = native["MODULES"]  # type: ignore[assignment]
    group: str = native["GROUP"]  # type: ignore[assignment]
    key = fingerprint(modules)
    if args.force or key != built_key():
        clean()  # a module that left the list must not keep a .so that shadows its source
        print(f"build_native: compiling {len(modules)} modules with mypyc…", file=sys.stderr)
        started = time.monotonic()
        build(modules, group, args.jobs)
        print(f"build_native: done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    write_manifest(modules, group, key)  # (the same bytes may have new mtimes: a checkout)
    if args.into:
        copy_into(args.into, modules, group, key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
