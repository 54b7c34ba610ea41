"""Shared by the browser tests: headless Chromium through selenium, and the app served by
`workbench app` in a subprocess on a free loopback port."""
from __future__ import annotations

import contextlib
import os
import shutil
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


@contextlib.contextmanager
def app_server(store_path: str | Path, *, demo: bool = False, timeout_s: float = 90.0):
    """Serve `workbench app` on a free port over `store_path`; yield its base URL."""
    from workbench.app.screenshots import serve

    log = Path(str(store_path) + ".app.log")
    with serve(Path(store_path), log, timeout_s, demo=demo) as url:
        yield url


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
