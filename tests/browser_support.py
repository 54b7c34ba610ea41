"""Shared by the browser tests: headless Chromium through selenium, and the app served by
`workbench app` in a subprocess on a free loopback port."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def chrome(download_dir: str | Path | None = None, width: int = 1400, height: int = 1000):
    """A headless Chromium driver (skips the test, with the reason, when it cannot start)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install -y "
                    "chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    if download_dir is not None:
        opts.add_experimental_option("prefs", {
            "download.default_directory": str(download_dir),
            "download.prompt_for_download": False})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_server(store_path: str | Path, *, demo: bool = False, timeout_s: float = 90.0):
    """Serve `workbench app` on a free port over `store_path`; yield its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "workbench.cli", "app", "--store", str(store_path),
           "--port", str(port)] + ([] if demo else ["--no-demo"])
    log = Path(str(store_path) + f".app-{port}.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"workbench app exited ({proc.returncode}):\n"
                                   + log.read_text()[-4000:])
            try:
                with urllib.request.urlopen(url + "/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("workbench app did not answer:\n" + log.read_text()[-4000:])
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_for(driver, css: str, timeout_s: float = 30.0, text: str | None = None):
    """The first element matching `css` (and containing `text`), waiting for it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout_s)
    if text is None:
        return wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))
    return wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, css), text)) and \
        driver.find_element(By.CSS_SELECTOR, css)
