"""Screenshots of every page of the web app, for the README.

    python -m workbench.app.screenshots --out docs/screenshots [--store PATH]

serves `workbench app` on a free loopback port (over `--store`, else a fresh temporary store
seeded with the demo study and CPU runs), opens each page in headless Chromium, waits until
its callbacks have settled (Dash titles the tab "Updating..." while any is in flight) and its
figures are drawn, and saves one full-page PNG per page (`explorer.png`, `studies.png`,
`validation.png`, `reports.png`). Needs `chromium` and `chromedriver` (Debian:
`apt-get install chromium chromium-driver`) and selenium.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PAGES = (("explorer", "/"), ("studies", "/studies"), ("validation", "/validation"),
         ("reports", "/reports"))
"""(PNG name, path) of every page shot, in the nav's order."""
WIDTH_PX = 1400
"""Browser window width of the shots."""
SETTLED_S = 1.0
"""How long the page must stay settled (no callback in flight, every figure drawn)."""
POLL_S = 0.25
"""Poll period of the waits."""
_SETTLED_JS = """
const main = document.querySelector('#_pages_content') || document.body;
if (document.title === 'Updating...' || document.readyState !== 'complete') return false;
if (!main || main.children.length === 0) return false;
return Array.from(main.querySelectorAll('.dash-graph')).every(
    g => g.querySelector('.main-svg') !== null);
"""


@contextlib.contextmanager
def serve(store_path: Path, log_path: Path, timeout_s: float, demo: bool = True):
    """`workbench app` over `store_path` in a subprocess (seeding an empty store with the
    demo unless `demo` is False); yield its base URL once it answers. Also used by the
    browser tests."""
    from ..runner.launch import free_port

    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "app", "--store",
                                 str(store_path), "--port", str(port)]
                                + ([] if demo else ["--no-demo"]),
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"workbench app exited ({proc.returncode}):\n"
                                   + log_path.read_text()[-3000:])
            try:
                with urllib.request.urlopen(url + "/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("workbench app did not answer:\n"
                                   + log_path.read_text()[-3000:])
            time.sleep(POLL_S)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def browser(width_px: int = WIDTH_PX, height_px: int = 1000):
    """Headless Chromium through selenium (RuntimeError saying what to install)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise RuntimeError("screenshots need selenium: pip install selenium") from None
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        raise RuntimeError("screenshots need chromium and chromedriver "
                           "(apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                "--disable-background-networking", "--disable-dev-shm-usage",
                f"--window-size={width_px},{height_px}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


def wait_settled(driver, timeout_s: float) -> bool:
    """Wait until the page has stayed settled for `SETTLED_S`; False if it never did."""
    deadline, since = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        if driver.execute_script(_SETTLED_JS):
            since = since or time.monotonic()
            if time.monotonic() - since >= SETTLED_S:
                return True
        else:
            since = None
        time.sleep(POLL_S)
    return False


def shoot(driver, url: str, out: Path, timeout_s: float, width_px: int = WIDTH_PX) -> bool:
    """Open `url`, wait for it, grow the window to the page's height and save a PNG to `out`;
    whether the page settled (the shot is saved either way)."""
    driver.set_window_size(width_px, 1000)
    driver.get(url)
    settled = wait_settled(driver, timeout_s)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width_px, min(max(int(height) + 40, 600), 6000))
    settled = wait_settled(driver, timeout_s / 2) and settled  # figures resize with the window
    out.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(out))
    return settled


def take(out_dir: Path, store: Path | None = None, timeout_s: float = 120.0,
         width_px: int = WIDTH_PX) -> list[Path]:
    """Shoot every page in `PAGES` into `out_dir`; return the PNG paths."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="workbench-shots-") as tmp:
        store_path = Path(store).expanduser() if store else Path(tmp) / "store.db"
        if store is not None and not store_path.is_file():
            raise ValueError(f"--store: no store at {store_path}")
        shots = []
        with serve(store_path, Path(tmp) / "app.log", timeout_s) as url:
            driver = browser(width_px)
            try:
                for name, path in PAGES:
                    png = out_dir / f"{name}.png"
                    if not shoot(driver, url + path, png, timeout_s, width_px):
                        print(f"warning: {path} had not settled after {timeout_s:g} s; "
                              "shot as it was", file=sys.stderr)
                    print(f"wrote {png}")
                    shots.append(png)
            finally:
                driver.quit()
        return shots


def main(argv=None) -> int:
    """`python -m workbench.app.screenshots --out DIR [--store PATH]`."""
    p = argparse.ArgumentParser(prog="python -m workbench.app.screenshots",
                                description="Save a PNG of every page of the web app.")
    p.add_argument("--out", type=Path, default=Path("docs/screenshots"),
                   help="folder for the PNGs (default docs/screenshots)")
    p.add_argument("--store", type=Path, help="store to show (default: a temporary store "
                   "seeded with the demo study and CPU runs)")
    p.add_argument("--timeout-s", type=float, default=120.0,
                   help="longest wait for the app and for each page (default 120)")
    p.add_argument("--width-px", type=int, default=WIDTH_PX, help="window width (default 1400)")
    args = p.parse_args(argv)
    if args.timeout_s <= 0:
        p.error(f"--timeout-s must be > 0, got {args.timeout_s}")
    if args.width_px < 600:
        p.error(f"--width-px must be >= 600, got {args.width_px}")
    try:
        take(args.out, args.store, args.timeout_s, args.width_px)
    except (RuntimeError, ValueError) as err:
        print(f"screenshots: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
