"""Fail any test that opens a file outside the repository: tests carry their own data in tests/fixtures.

An audit hook on the "open" event (builtins.open, io.open, os.open, io.open_code; args (path, mode, flags))
records every str/bytes/PathLike path that resolves outside the repository root and outside the few places
a Python process legitimately reads (the Python installation, the temp dir, /dev, /proc, /sys, /etc, the
user's cache/config dirs, system fonts and shared data). The hook never raises (an audit hook cannot be
removed, and an exception there would break whatever opened the file); it only appends to the innermost
active recording. Hook wrappers around each test's setup, call and teardown (and around collecting each
module) turn what was recorded into a failure that names the paths.

tests/conftest.py imports the pytest hooks from here; a nested `pytest -p _guard` loads this module directly.
"""

from __future__ import annotations

import contextlib
import os
import site
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

ROOT = os.path.realpath(Path(__file__).resolve().parents[1])  # the repository: the folder above tests/
HOME = os.path.realpath(os.path.expanduser("~"))


def _prefix(path: str) -> str:
    path = os.path.realpath(os.path.abspath(os.path.expanduser(path)))
    return path if path.endswith(os.sep) else path + os.sep


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return (path + os.sep).startswith(prefixes)


# Always outside, whatever the allow list says (the temp dir or a site dir could contain them): the shared
# reference data next to the checkout, which tests once read directly.
DENIED = tuple(sorted({_prefix(os.path.join(os.path.dirname(ROOT), "shared")), _prefix("/work/shared")}))


def _python_dirs() -> set[str]:
    dirs = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib", "include", "platinclude")}
    dirs.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    dirs.add(site.getusersitepackages())
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        if os.path.realpath(prefix) not in ("/", "/usr", "/usr/local"):
            dirs.add(prefix)
    # Code on sys.path (zipped stdlib, lib-dynload, .pth entries), but not '' / the cwd / a folder above ROOT.
    for entry in sys.path:
        if entry and os.path.isabs(entry) and not _under(ROOT, (_prefix(entry),)):
            dirs.add(entry)
    return dirs


def _allowed() -> tuple[str, ...]:
    env = os.environ.get
    dirs = {ROOT, tempfile.gettempdir(), "/dev", "/proc", "/sys", "/etc"}
    dirs |= _python_dirs()
    # Caches and configuration that libraries (torch inductor, triton, matplotlib, fontconfig, huggingface) use.
    dirs |= {
        env("XDG_CACHE_HOME") or os.path.join(HOME, ".cache"),
        os.path.join(env("XDG_CONFIG_HOME") or os.path.join(HOME, ".config"), "matplotlib"),
        os.path.join(env("XDG_CONFIG_HOME") or os.path.join(HOME, ".config"), "fontconfig"),
        os.path.join(HOME, ".matplotlib"),
        os.path.join(HOME, ".triton"),
        os.path.join(HOME, ".nv"),
        "/usr/share/fonts", "/usr/local/share/fonts", "/usr/share/zoneinfo", "/var/cache/fontconfig",
        os.path.join(HOME, ".fonts"), os.path.join(HOME, ".local", "share", "fonts"),
        "/usr/lib/os-release",  # where /etc/os-release points (platform.freedesktop_os_release: the openai client)
    }
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "MPLCONFIGDIR", "HF_HOME", "TORCH_HOME"):
        if env(var):
            dirs.add(env(var))
    return tuple(sorted({_prefix(d) for d in dirs if d}))


ALLOWED = _allowed()


def outside_repository(path) -> bool:
    """True when opening `path` would read outside the repository and outside the allowed system places.

    `path` is a str, bytes or os.PathLike (relative paths are taken from the cwd); anything else (an integer
    file descriptor, None) is never outside.
    """
    if isinstance(path, (bytes, str)) or hasattr(path, "__fspath__"):
        path = os.fsdecode(os.fspath(path))
    else:
        return False
    full = os.path.realpath(os.path.abspath(path))
    if _under(full, DENIED) or _under(os.path.abspath(path), DENIED):
        return True
    return not _under(full, ALLOWED)


_stack: list[list[str]] = []  # one list per active recording; the hook appends to the innermost
_seen: dict[str, bool] = {}  # absolute path -> outside? (cached: the hook runs on every open, imports included)


def _hook(event: str, args: tuple) -> None:
    if event != "open" or not _stack:
        return
    try:
        path = args[0]
        if isinstance(path, int) or path is None:
            return
        if not isinstance(path, (bytes, str)):
            if not hasattr(path, "__fspath__"):
                return
            path = os.fspath(path)
        path = os.path.abspath(os.fsdecode(path))
        outside = _seen.get(path)
        if outside is None:
            outside = _seen[path] = outside_repository(path)
        if outside:
            _stack[-1].append(os.path.realpath(path))
    except BaseException:  # never raise from an audit hook
        pass


_installed = False


def install() -> None:
    """Install the audit hook once per process (audit hooks cannot be removed)."""
    global _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True


def installed() -> bool:
    return _installed


@contextlib.contextmanager
def watching():
    """Record the outside paths opened inside the block, in order, without duplicates removed.

    Recordings nest: an inner block gets the paths opened inside it and the outer block does not see them.
    """
    install()
    seen: list[str] = []
    _stack.append(seen)
    try:
        yield seen
    finally:
        _stack.remove(seen)


def message(paths: list[str], when: str) -> str:
    unique = list(dict.fromkeys(paths))
    listed = "\n".join(f"  {p}" for p in unique)
    return (f"test opened {len(unique)} file(s) outside the repository {ROOT} during {when}:\n{listed}\n"
            "Tests must carry their data in tests/fixtures/ (see tests/fixtures/README.md); they never read "
            "outside the repository.")


def _run_phase(item, when: str):
    with watching() as seen:
        try:
            result = yield
        except BaseException:
            if seen:  # the test failed (or skipped) on its own: keep that outcome and add what we saw
                item.add_report_section(when, "outside the repository", message(seen, when))
            raise
    if seen:
        pytest.fail(message(seen, when), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _run_phase(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _run_phase(item, "call"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item):
    return (yield from _run_phase(item, "teardown"))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """Importing a test module (module-level code) must not read outside the repository either."""
    if not isinstance(collector, pytest.Module):
        return (yield)
    with watching() as seen:
        report = yield
    if seen and report.outcome != "failed":
        report.outcome = "failed"
        report.longrepr = message(seen, f"collection of {collector.nodeid}")
    return report


install()
