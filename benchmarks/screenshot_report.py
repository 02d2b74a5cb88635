"""Does a run's report.html render, pictures included, in a real browser? A headless Chromium screenshot.

Takes a screenshot of RUN_FOLDER/report.html (``chromium --headless --screenshot``) and of the same page with
its images taken out, then checks the first is not blank (pixel spread) and is taller than the text alone
(it has more rows that are not white: the pictures drew). Needs chromium, chromium-browser or google-chrome
on PATH (Debian: ``apt-get install chromium``); exits 2 without one.

    python benchmarks/screenshot_report.py RUN_FOLDER [--out report.png] [--window 1200,3000]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
MIN_SPREAD = 10.0  # the standard deviation of the gray levels of a page that shows something (a blank one: 0)
MIN_EXTRA_ROWS = 150  # the pictures must add at least this many non-white rows to the text alone


def find_browser() -> str | None:
    """The first of chromium, chromium-browser, google-chrome on PATH, or None."""
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def screenshot(browser: str, page: Path, out: Path, window=(1200, 3000), timeout: float = 120) -> Path:
    """A headless screenshot of the local ``page`` into ``out`` (PNG); a RuntimeError when none is written."""
    command = [
        browser,
        "--headless",
        "--no-sandbox",  # needed as root (containers); the page is a local file the caller chose
        "--disable-gpu",
        "--hide-scrollbars",
        "--allow-file-access-from-files",
        f"--screenshot={out}",
        f"--window-size={window[0]},{window[1]}",
        page.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if not out.exists():
        raise RuntimeError(f"{browser} wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}")
    return out


def page_numbers(png: Path) -> dict:
    """The screenshot's gray-level spread and its rows that are not white."""
    import numpy as np
    from PIL import Image

    gray = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    return {"height": gray.shape[0], "spread": float(gray.std()), "inked_rows": int((gray.min(axis=1) < 245).sum())}


def check_report(folder, out=None, window=(1200, 3000), browser: str | None = None) -> dict:
    """Screenshots ``folder``/report.html with and without its images; returns the numbers and ``ok``."""
    folder = Path(folder)
    page = folder / "report.html"
    if not page.exists():
        raise FileNotFoundError(f"{page} does not exist; give a run folder with a report.")
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError(f"none of {', '.join(BROWSERS)} is on PATH; install one (apt-get install chromium).")
    with tempfile.TemporaryDirectory(prefix="report-shot-") as tmp:
        tmp = Path(tmp)
        text_only = tmp / "text_only.html"
        text_only.write_text(re.sub(r"<img\b[^>]*>", "", page.read_text(encoding="utf-8")), encoding="utf-8")
        full = screenshot(browser, page, Path(out) if out else tmp / "report.png", window)
        plain = screenshot(browser, text_only, tmp / "text_only.png", window)
        shot, text = page_numbers(full), page_numbers(plain)
    images = len(re.findall(r"<img\b", page.read_text(encoding="utf-8")))
    ok = shot["spread"] >= MIN_SPREAD and shot["inked_rows"] >= text["inked_rows"] + min(MIN_EXTRA_ROWS, 50 * images)
    return {"report": str(page), "images": images, "screenshot": shot, "text_only": text, "ok": bool(ok and images)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_folder", help="a run folder (or any folder) with report.html")
    parser.add_argument("--out", help="where the screenshot goes (default: a temporary file)")
    parser.add_argument("--window", default="1200,3000", help="browser window WIDTH,HEIGHT in pixels")
    args = parser.parse_args()
    try:
        window = tuple(int(v) for v in args.window.split(","))
        if len(window) != 2 or min(window) < 100:
            raise ValueError
    except ValueError:
        parser.error(f"--window {args.window}: give WIDTH,HEIGHT in pixels, e.g. 1200,3000")
    browser = find_browser()
    if browser is None:
        print(f"Error: none of {', '.join(BROWSERS)} is on PATH; install one (apt-get install chromium).")
        return 2
    result = check_report(args.run_folder, args.out, window, browser)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
