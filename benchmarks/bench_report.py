"""`regdit report`'s run page, opened in headless Chromium as a person would: the time to write the
page and the time until every panel is drawn, its size, and screenshots in a 1400x1000 window and a
420x900 phone (the README's docs/report.png and docs/report-phone.png).

    python benchmarks/bench_report.py EXP_DIR [EXP_DIR ...] --screenshot docs/report.png \\
        --phone-screenshot docs/report-phone.png

Needs `apt-get install chromium chromium-driver` and `pip install -e '.[dev]'` (selenium).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

# the browser tests' helpers: the same Chromium options
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_app import full_page_screenshot  # noqa: E402
from test_app import start_chromium  # noqa: E402

from regdit.commands.cli import main as regdit  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exp_dirs", nargs="+", metavar="EXP_DIR", help="runs of `regdit train`")
    parser.add_argument("--screenshot", default="report.png", help="PNG of the page at 1400 px")
    parser.add_argument("--phone-screenshot", default="report-phone.png",
                        help="PNG of the page at 420 px")
    args = parser.parse_args()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    page = Path(tempfile.mkdtemp(prefix="regdit-report-")) / "report.html"
    start = time.perf_counter()
    regdit(["report", *args.exp_dirs, "--output", str(page)])
    times = {"regdit report to the page written": time.perf_counter() - start}
    driver = start_chromium()
    try:
        start = time.perf_counter()
        driver.get(page.as_uri())
        panels = len(driver.find_elements(By.CSS_SELECTOR, ".panel"))
        WebDriverWait(driver, 300).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".panel .main-svg")) >= panels)
        times["opening to every panel drawn"] = time.perf_counter() - start
        full_page_screenshot(driver, args.screenshot)
        driver.set_window_size(420, 900)
        full_page_screenshot(driver, args.phone_screenshot)
    finally:
        driver.quit()
    print(f"regdit report of {len(args.exp_dirs)} runs: {page.stat().st_size / 1e6:.1f} MB, "
          f"{panels} panels\n\n| step | seconds |\n|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.1f} |")
    print(f"\nscreenshots: {args.screenshot}, {args.phone_screenshot}")


if __name__ == "__main__":
    main()
