"""The repository's own rules for its tests: they carry their data (tests/fixtures/) and never read outside."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import _guard
import pytest
from _guard import outside_repository

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def _outside_file() -> Path | None:
    """A new file in a writable folder that is outside the repository and outside the temp dir, or None."""
    for folder in (ROOT.parent, Path.home()):
        probe = folder / ".nanopali-guard-probe"
        if folder.is_dir() and os.access(folder, os.W_OK) and outside_repository(probe):
            with _guard.watching():  # creating it opens it: keep that out of this test's own recording
                fd, name = tempfile.mkstemp(dir=folder, prefix=".nanopali-guard-", suffix=".txt")
                os.write(fd, b"outside\n")
                os.close(fd)
            return Path(name)
    return None


@pytest.fixture
def outside_file():
    path = _outside_file()
    if path is None:
        pytest.skip("no writable folder outside both the repository and the temp dir")
    yield path
    path.unlink()


def test_outside_repository_classifies_paths():
    assert _guard.installed()
    # Inside the repository, the fixtures included.
    assert not outside_repository(ROOT / "tests" / "fixtures" / "vqvae" / "vae-random.npz")
    assert not outside_repository(str(ROOT / "pyproject.toml"))
    assert not outside_repository(os.fsencode(ROOT / "nanopali" / "__init__.py"))
    # The shared reference data next to the checkout, however it is spelled.
    assert outside_repository("/work/shared/x")
    assert outside_repository("/work/shared/reference/vqvae/parse_ref_bigvision.json")
    assert outside_repository(ROOT.parent / "shared" / "reference" / "vqvae" / "vae-random.npz")
    assert outside_repository(ROOT / ".." / "shared" / "x")
    assert outside_repository(ROOT / "tests" / ".." / ".." / "shared" / "x")
    assert outside_repository(b"/work/shared/x")
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        assert outside_repository("../shared/reference/vqvae/vae-random.npz")
        assert not outside_repository("tests/fixtures/vqvae/vae-random.npz")
    finally:
        os.chdir(cwd)
    # Elsewhere on the machine: the home folder, other projects, the root.
    assert outside_repository(Path.home() / "data.npz")
    assert outside_repository("/data.bin")
    # The places a Python process legitimately reads.
    assert not outside_repository(os.__file__)  # the standard library
    assert not outside_repository(pytest.__file__)  # site-packages
    assert not outside_repository(Path(tempfile.gettempdir()) / "pytest-of-x" / "f")
    for system in ("/dev/null", "/proc/self/status", "/sys/devices", "/etc/hosts", "/usr/share/fonts/x.ttf"):
        assert not outside_repository(system), system
    assert not outside_repository(Path.home() / ".cache" / "torch" / "x")
    # Not paths at all.
    assert not outside_repository(3)
    assert not outside_repository(None)


def test_a_symlink_out_of_the_fixtures_counts_as_outside(tmp_path):
    link = tmp_path / "vae.npz"
    link.symlink_to("/work/shared/reference/vqvae/vae-random.npz")
    assert outside_repository(link)


def test_the_audit_hook_records_opening_a_file_outside(outside_file):
    inside = ROOT / "tests" / "fixtures" / "README.md"
    with _guard.watching() as seen:
        inside.read_text()
        with tempfile.TemporaryFile():
            pass
        os.close(os.open(os.devnull, os.O_RDONLY))
        assert seen == []
        outside_file.read_text()  # builtins/io.open
        os.close(os.open(outside_file, os.O_RDONLY))  # os.open
        with open(os.fsencode(outside_file), "rb"):  # bytes path
            pass
    assert seen == [os.path.realpath(outside_file)] * 3
    assert "tests/fixtures" in _guard.message(seen, "call") and str(outside_file) in _guard.message(seen, "call")


def test_tests_never_read_outside_the_repository(outside_file, tmp_path):
    """A nested pytest run with the guard: a test that opens a file outside the repository fails, naming it."""
    (tmp_path / "test_inner.py").write_text(
        "import pytest\n"
        f"OUTSIDE = {str(outside_file)!r}\n"
        f"FIXTURE = {str(ROOT / 'tests' / 'fixtures' / 'vqvae' / 'README.md')!r}\n"
        "def test_reads_outside():\n"
        "    open(OUTSIDE).read()\n"
        "def test_reads_outside_and_fails_anyway():\n"
        "    open(OUTSIDE).read()\n"
        "    assert False, 'its own failure'\n"
        "@pytest.fixture(scope='module')\n"
        "def data():\n"
        "    return open(OUTSIDE).read()\n"
        "def test_reads_outside_in_a_module_fixture(data):\n"
        "    pass\n"
        "def test_reads_its_fixtures(tmp_path):\n"
        "    open(FIXTURE).read()\n"
        "    (tmp_path / 'x').write_text('x')\n"
        "    (tmp_path / 'x').read_text()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "_guard", "-p", "no:cacheprovider", "-q", "-rA", "test_inner.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "FAILED test_inner.py::test_reads_outside " in out, out
    assert "FAILED test_inner.py::test_reads_outside_and_fails_anyway" in out and "its own failure" in out, out
    assert "ERROR test_inner.py::test_reads_outside_in_a_module_fixture" in out, out
    assert "PASSED test_inner.py::test_reads_its_fixtures" in out, out
    assert "outside the repository" in out and str(outside_file) in out and "tests/fixtures" in out, out
