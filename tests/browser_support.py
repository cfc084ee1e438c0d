"""A real headless Chromium for browser tests, driven through ChromeDriver with Selenium.

Both come from Debian's packages (`chromium`, `chromium-driver`; scripts/install.sh
installs them): no browser is downloaded at test time. Tests that need a browser use
`headless_chromium()`; where the binaries are missing the test fails with what to install,
rather than being skipped, so CI cannot go green without the browser having run.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@contextlib.contextmanager
def headless_chromium(download_dir: Path | None = None, width: int = 1400, height: int = 900) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} missing: run scripts/install.sh (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    if download_dir:
        options.add_experimental_option("prefs", {"download.default_directory": str(download_dir)})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
