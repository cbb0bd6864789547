"""`regdit app` on a checkpoint, driven in headless Chromium as a person would use it: the time from
the command to a page that answers, and from a click on Generate to each grid shown. Saves
screenshots of the page in a 1400x1000 window and a 420x900 phone (the README's docs/app.png and
docs/app-phone.png come from the demo's checkpoint).

    regdit demo  # regdit-demo/train/checkpoints/0001500.pt
    python benchmarks/bench_app.py --ckpt regdit-demo/train/checkpoints/0001500.pt \\
        --screenshot docs/app.png --phone-screenshot docs/app-phone.png

Grid A is the sampling the page opens on (the checkpoint's own: for the demo's, SDE 100 steps with
guidance 2 on the image and the class token), grid B the same seeds without guidance. Needs
`apt-get install chromium chromium-driver` and `pip install -e '.[dev]'` (selenium).
"""
import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

# the browser test's helpers: the same Chromium options and app start
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_app import start_app, start_chromium, type_into  # noqa: E402


def grid_images(driver, grid):
    from selenium.webdriver.common.by import By
    return driver.find_elements(By.CSS_SELECTOR, f"#{grid} .grid-container img")


def full_page_screenshot(driver, path):
    """A screenshot of the whole page at the window's width: the window grows to its height."""
    width = driver.get_window_size()["width"]
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, height + 140)  # the window's frame
    time.sleep(1)  # relaid out
    driver.save_screenshot(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint or export to open")
    parser.add_argument("--screenshot", default="app.png", help="PNG of the page after both grids")
    parser.add_argument("--phone-screenshot", default="app-phone.png",
                        help="PNG of the page in a 420x900 window")
    parser.add_argument("--class-name", default="red triangle", help="class picked by name")
    args = parser.parse_args()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    driver = start_chromium()
    log = tempfile.NamedTemporaryFile("w", prefix="regdit-app-", suffix=".log", delete=False)
    start = time.perf_counter()
    app = start_app(args.ckpt, port, log)
    times = {"regdit app to a page that answers": time.perf_counter() - start}
    try:
        wait = WebDriverWait(driver, 600)
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#generate"))
        type_into(driver, "class", args.class_name)
        option = f"[role=option][aria-label^='{args.class_name} (']"
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, option))[0].click()
        driver.find_element(By.CSS_SELECTOR, "#compare input").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#steps-B input"))
        # grid B: the same sampling without guidance
        type_into(driver, "cfg-B", "1")
        type_into(driver, "cls-cfg-B", "0")
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        click = time.perf_counter()
        for grid in ("A", "B"):
            wait.until(lambda d, grid=grid: grid_images(d, f"grid-{grid}"))
            times[f"Generate to grid {grid} shown"] = time.perf_counter() - click
        images = len(grid_images(driver, "grid-A"))
        steps = driver.find_element(By.CSS_SELECTOR, "#steps-A input").get_attribute("value")
        full_page_screenshot(driver, args.screenshot)
        driver.set_window_size(420, 900)
        full_page_screenshot(driver, args.phone_screenshot)
    finally:
        driver.quit()
        app.terminate()
        app.wait(timeout=30)
    print(f"regdit app on {args.ckpt} (CPU), {images} images per grid, {steps} steps\n\n"
          "| step | seconds |\n|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.1f} |")
    print(f"\nscreenshots: {args.screenshot}, {args.phone_screenshot}")


if __name__ == "__main__":
    main()
