"""The playground in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`, `make
browser-deps`) driven by selenium, against `backtrack serve` in front of the built-in demo upstream.

The page's screenshot, taken mid-reset, is saved as a test artifact (`BACKTRACK_ARTIFACTS`, else the
test's tmp folder); with `BACKTRACK_SCREENSHOT=PATH` it is written to PATH as well (the README's
`docs/playground.png` is made that way).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import serving, write_policies
from tests.support import REPO

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)"
)
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
DEMO_ROWS = (REPO / "proxy/replay/demo/corpus.jsonl").read_text(encoding="utf-8").splitlines()
DEMO = {row["id"]: row for row in map(json.loads, DEMO_ROWS)}
LOCK = DEMO["pick-lock"]
BEFORE_MARKER, AFTER_MARKER = LOCK["response"].split("[RESET]")
# The demo upstream's own [RESET] is what resets here: no guard model to load, the same run every time.
# The hold-back is the shipped default's, so that some of the answer is shown before it is taken back.
POLICY = {
    "description": "The demo: the upstream's own [RESET] marker, the default hold-back.",
    "detectors": {"marker": {"enabled": True}, "patterns": [], "model": {"enabled": False}},
    "holdback_tokens": 24,
    "actions": {"default": "refuse", "upstream_reset": "continue"},
}
# The answer's struck-through span, read in one go (the page redraws the answer as text streams in).
STRUCK = """
const del = document.querySelector("[data-testid=answer] del");
return del && [del.textContent, getComputedStyle(del).textDecorationLine];
"""


@pytest.fixture
def driver() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("Chromium or chromedriver is not installed (make browser-deps installs both)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    except WebDriverException as exc:
        pytest.skip(f"Chromium cannot run here: {exc.msg}")
    try:
        yield browser
    finally:
        browser.quit()


def save_screenshot(browser: Any, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("BACKTRACK_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "playground.png"
    browser.save_screenshot(str(path))
    if os.environ.get("BACKTRACK_SCREENSHOT"):
        shutil.copyfile(path, REPO / os.environ["BACKTRACK_SCREENSHOT"])
    return path


async def test_the_playground_shows_a_reset_mended_live(driver: Any, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "server": {"playground": True},
                "upstream": {"url": None},  # the built-in demo upstream
                "policies": write_policies(tmp_path, demo=POLICY),
                "default_policy": "demo",
            }
        ),
        encoding="utf-8",
    )
    async with serving("--config", config) as (root, _):
        driver.get(f"{root}/playground")
        find = driver.find_element
        find(By.CSS_SELECTOR, "[data-testid=prompt]").send_keys(LOCK["prompt"])
        find(By.CSS_SELECTOR, "[data-testid=send]").click()

        wait = WebDriverWait(driver, 30)
        # Mid-reset: the retracted text is still struck through in the answer.
        text, decoration = wait.until(lambda d: d.execute_script(STRUCK))
        assert decoration == "line-through"
        assert text and BEFORE_MARKER.startswith(text)
        screenshot = save_screenshot(driver, tmp_path)

        wait.until(lambda d: "done" in d.find_element(By.CSS_SELECTOR, "[data-testid=status]").text)
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "[data-testid=answer] del"))
        assert find(By.CSS_SELECTOR, "[data-testid=answer]").get_attribute("textContent") == AFTER_MARKER

        (event,) = driver.find_elements(By.CSS_SELECTOR, "[data-testid=reset-event]")
        retracted = event.find_element(By.CSS_SELECTOR, "[data-testid=retracted]")
        assert retracted.value_of_css_property("text-decoration-line") == "line-through"
        taken_back = retracted.get_attribute("textContent")
        assert taken_back and BEFORE_MARKER.startswith(taken_back)
        fields = json.loads(event.find_element(By.CSS_SELECTOR, ".fields").text)
        assert fields["event"] == "reset" and fields["category"] == "upstream_reset"
        assert fields["retract_chars"] == len(taken_back)

        scores = find(By.CSS_SELECTOR, "[data-testid=scores]")
        assert scores.get_attribute("data-crossed") == "true"
        assert float(scores.get_attribute("data-max")) == 1.0  # the marker detector's score
        assert "[RESET]" in find(By.CSS_SELECTOR, "[data-testid=unguarded]").text
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
    assert screenshot.stat().st_size > 10_000
