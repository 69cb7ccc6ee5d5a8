"""Fixtures for the real-browser tests: JupyterLab on a free local port, and headless Chromium.

When these tests run
    Only when ``tests/browser`` is named on the pytest command line, as ``make test-browser``
    does (``pytest tests/browser``). Plain ``make test`` collects them and skips them with the
    reason shown: CI runs ``make test-browser`` right after ``make test``, so running them in
    both would only cost time, and they need Debian's ``chromium`` and ``chromium-driver``,
    which a developer's machine may not have.
    They are also skipped, with the reason, when chromium, chromedriver or selenium is missing.

What a person can look at afterwards
    ``runs/browser/`` (git-ignored) holds the screenshots, JupyterLab's log and, when a step
    failed, a screenshot and the page source of that moment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

BROWSER_DIR = Path(__file__).resolve().parent
ROOT = BROWSER_DIR.parents[1]
#: Screenshots, page sources and JupyterLab's log, for a person to look at (git-ignored: runs/).
SHOTS = ROOT / "runs" / "browser"
#: A window tall enough to show the whole widget panel at once.
WINDOW = (1600, 2400)


# --------------------------------------------------------------------------------------------
# when to run: only when asked for, and only where the browser is installed
# --------------------------------------------------------------------------------------------


def pytest_collection_modifyitems(config, items):
    """Skip the browser tests (with the reason) unless tests/browser was asked for and can run."""
    ours = [item for item in items if BROWSER_DIR in item.path.parents]
    reason = why_not_run(config) if ours else ""
    for item in ours if reason else []:
        item.add_marker(pytest.mark.skip(reason=reason))


def why_not_run(config) -> str:
    """Why the browser tests cannot or should not run here; empty when they should."""
    if not named_on_command_line(config):
        return "real-browser test (JupyterLab + headless Chromium): run it with `make test-browser`"
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        return (f"{' and '.join(missing)} not found on PATH; install them with "
                "`apt-get install -y --no-install-recommends chromium chromium-driver` (as .ci/run does)")
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed in this Python; `pip install -e '.[test]'` installs it"
    return ""


def named_on_command_line(config) -> bool:
    """True when a path given to pytest is tests/browser or lies inside it.

    ``pytest`` with no paths collects ``testpaths`` (``tests``): that is ``make test``, and it
    does not count as asking for the browser tests.
    """
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        return False
    for arg in config.args:
        path = (config.invocation_params.dir / arg.split("::")[0]).resolve()
        if path == BROWSER_DIR or BROWSER_DIR in path.parents:
            return True
    return False


# --------------------------------------------------------------------------------------------
# JupyterLab
# --------------------------------------------------------------------------------------------


@dataclass
class Lab:
    """A running JupyterLab: its address, the folder it serves and its log file."""

    url: str
    root: Path
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of JupyterLab's log (kernel errors show up there too)."""
        if not self.log.is_file():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def shots() -> Path:
    """``runs/browser/``, emptied of the screenshots and logs of an earlier run."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in [*SHOTS.glob("*.png"), *SHOTS.glob("*.html"), *SHOTS.glob("*.log")]:
        old.unlink()
    return SHOTS


@pytest.fixture
def jupyter_lab(tmp_path, shots):
    """JupyterLab serving an empty folder of its own, on a free port of 127.0.0.1, with no token.

    It runs in the environment ``make lab`` gives: this shell's variables plus the Makefile's
    ``WANDB_MODE=offline`` and ``WANDB_SILENT=true``, and nothing else that reaches the kernel
    (in particular no MPLBACKEND: the ``workbench`` kernelspec sets the inline backend itself).
    Only Jupyter's own folders (config, runtime, settings, workspaces) and the workbench cache
    point into ``tmp_path``, so the test neither reads nor changes the user's.
    """
    from workbench.execute import ensure_kernel

    ensure_kernel("workbench")  # the notebook's kernel; without it JupyterLab asks which kernel to use
    root, jupyter_home = tmp_path / "root", tmp_path / "jupyter"
    root.mkdir()
    runtime_dir = jupyter_home / "runtime"
    settings_dir = jupyter_home / "lab-settings"
    news = settings_dir / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    # no "Would you like to get notified about official Jupyter news?" toast over the screenshots
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))

    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")  # as the Makefile's `export WANDB_MODE ?= offline`
    env.setdefault("WANDB_SILENT", "true")
    env.update({
        "WORKBENCH_CACHE": str(tmp_path / "workbench-cache"),
        "JUPYTER_CONFIG_DIR": str(jupyter_home / "config"),
        "JUPYTER_RUNTIME_DIR": str(runtime_dir),
        "JUPYTERLAB_SETTINGS_DIR": str(settings_dir),
        "JUPYTERLAB_WORKSPACES_DIR": str(jupyter_home / "workspaces"),
    })
    jupyter = Path(sys.executable).parent / "jupyter"  # .venv/bin/jupyter under make
    port = free_port()
    command = [
        str(jupyter), "lab", "--no-browser", "--allow-root",  # CI runs as root
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        "--IdentityProvider.token=", f"--ServerApp.root_dir={root}",
    ]
    lab = Lab(url=f"http://127.0.0.1:{port}", root=root, log=shots / "jupyterlab.log")
    with open(lab.log, "w") as log:
        server = subprocess.Popen(command, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        wait_for_server(lab, server, timeout=120)
        yield lab
    finally:
        stop_server(server, runtime_dir)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_server(lab: Lab, server: subprocess.Popen, *, timeout: float) -> None:
    """Poll JupyterLab's /api/status until it answers; fail with its log if it exits or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with code {server.returncode} before it answered. Its log:\n"
                        f"{lab.log_tail()}")
        try:
            with urllib.request.urlopen(f"{lab.url}/api/status", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer {lab.url}/api/status within {timeout:.0f} s. Its log:\n{lab.log_tail()}")


def stop_server(server: subprocess.Popen, runtime_dir: Path) -> None:
    """Stop JupyterLab and the kernels it started.

    On SIGTERM JupyterLab shuts its kernels down itself. Kernels run in sessions of their own, so
    if JupyterLab has to be killed, the kernels still running with a connection file in this
    test's runtime folder are ended one by one, by their process id.
    """
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
    for pid in processes_mentioning(runtime_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # ended meanwhile
            pass


def processes_mentioning(folder: Path) -> list[int]:
    """Ids of the processes whose command line mentions ``folder`` (Linux /proc; elsewhere none)."""
    proc, needle, found = Path("/proc"), str(folder).encode(), []
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # the process ended while we looked
            pass
    return found


# --------------------------------------------------------------------------------------------
# Chromium
# --------------------------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium driven by selenium, quit at the end whatever happened.

    Both programs are given by path (Debian's /usr/bin/chromium and /usr/bin/chromedriver), so
    Selenium Manager never runs and nothing is downloaded.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",  # Chromium's sandbox refuses to run as root (CI)
        "--disable-dev-shm-usage",  # containers often have a small /dev/shm
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    service = Service(executable_path=shutil.which("chromedriver"), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(120)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
