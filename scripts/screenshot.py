"""Screenshot an HTML file in headless Chromium (Debian's chromium + chromium-driver), for the docs.

    python scripts/screenshot.py runs/r/report.html docs/report.png --height 2400 --scale 0.5
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("page", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--width", type=int, default=1300)
    p.add_argument("--height", type=int, default=2000)
    p.add_argument("--scale", type=float, default=0.5, help="shrink the PNG by this factor")
    args = p.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--window-size={args.width},{args.height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)
    try:
        driver.get(args.page.resolve().as_uri())
        driver.save_screenshot(str(args.out))
    finally:
        driver.quit()
    img = Image.open(args.out).convert("RGB")
    img = img.resize((int(img.width * args.scale), int(img.height * args.scale)), Image.Resampling.LANCZOS)
    img.quantize(colors=128).save(args.out, optimize=True)
    print(f"{args.out}: {img.size[0]}x{img.size[1]}, {args.out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
