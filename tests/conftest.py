import os
import signal
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# Every process a test starts (ranks, launchers, scripts) prints the Python stack of each of
# its threads if it dies of a signal: a crashed rank otherwise leaves only "SIGSEGV" behind.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def spill_dir(tmp_path):
    """A spill directory on the real disk (not tmpfs), so O_DIRECT is exercised."""
    d = tmp_path / "spill"
    yield str(d)
    leftovers = [os.path.join(r, f) for r, _, files in os.walk(d) for f in files]
    assert not leftovers, f"spill files left behind: {leftovers}"


# -- skips are stated, never silent ------------------------------------------------------------
# CI sets SSDOFFLOAD_EXPECTED_SKIPS to a regular expression of the skip reasons expected on its
# machine class (no GPU); a test skipped for any other reason (a tool missing, not root, a
# package that failed to install) fails the run, named with its reason, instead of leaving CI
# green with the test unrun.
_skips = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append((report.nodeid, reason))


def pytest_sessionfinish(session, exitstatus):
    import re

    expected = os.environ.get("SSDOFFLOAD_EXPECTED_SKIPS")
    if expected is None:
        return
    unexpected = [(node, why) for node, why in _skips if not re.search(expected, why)]
    if unexpected:
        lines = "\n".join(f"  {node}: {why}" for node, why in unexpected)
        session.config.get_terminal_writer().line(
            f"\n{len(unexpected)} test(s) skipped for a reason this machine should not have "
            f"(expected: {expected!r}):\n{lines}", red=True)
        session.exitstatus = 1


# -- a busy machine ----------------------------------------------------------------------------
def _start_hog():
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _stop_hog(hog):
    hog.send_signal(signal.SIGKILL)
    hog.wait()


@pytest.fixture
def cpu_hog():
    """A process spinning on a core for the duration of the test (the I/O threads and the
    compute thread fight for the CPU, as on a busy machine); stopped afterwards."""
    hog = _start_hog()
    try:
        yield hog
    finally:
        _stop_hog(hog)


@pytest.fixture(scope="session", autouse=True)
def _session_cpu_hog():
    """``SSDOFFLOAD_CPU_HOG=1``: one spinning process for the whole run (CI's chaos run)."""
    if os.environ.get("SSDOFFLOAD_CPU_HOG") != "1":
        yield None
        return
    hog = _start_hog()
    try:
        yield hog
    finally:
        _stop_hog(hog)


def pytest_terminal_summary(terminalreporter):
    """The fuzzer's census (``tests/test_fuzz.py``): what its programs exercised."""
    fuzz = sys.modules.get("test_fuzz")
    census = getattr(fuzz, "CENSUS", None)
    if census is not None and census.rows:
        terminalreporter.write_sep("-", "fuzz census")
        for line in census.report().splitlines():
            terminalreporter.write_line(line)
