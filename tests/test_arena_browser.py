"""The arena page in the system's headless Chromium, driven by selenium against the real app:
set the key, type a prompt, get two anonymous answers, vote, see the names and the leaderboard.

Needs Debian's `chromium` and `chromium-driver` (`make test` installs them when missing).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from dpo_cluster.config import load_config
from dpo_cluster.serving.launch import start_serving, stop_serving
from tests.serve_helpers import API_KEY, Client, build_lora_final

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, serve_port: int) -> Iterator[str]:
    root = tmp_path_factory.mktemp("arena")
    final = build_lora_final(root / "final")
    (root / "key").write_text(API_KEY)
    config = load_config(
        None,
        [
            "serve.base=builtin:tiny",
            f"serve.tuned={final}",
            f"serve.port={serve_port}",
            f"serve.arena_db={root / 'votes.sqlite'}",
            f"serve.api_key_file={root / 'key'}",
            "serve.num_cpus=0",
            "serve.default_max_new_tokens=12",
        ],
        serving=True,
    )
    yield start_serving(config).base
    stop_serving()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: install Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_arena_page_battle_vote_and_leaderboard(served: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(served + "/arena")
    assert "arena" in browser.title

    # Without the key the server refuses, and the page says so.
    browser.find_element(By.ID, "prompt").send_keys("Suggest a title for a video about bread")
    browser.find_element(By.ID, "battle").click()
    wait.until(lambda d: "401" in d.find_element(By.ID, "error").text)

    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.ID, "save-key").click()
    browser.find_element(By.ID, "battle").click()
    vote_a = (By.CSS_SELECTOR, "#votes button[data-winner='A']")
    wait.until(ec.element_to_be_clickable(vote_a))
    # The text the page set, exactly: `.text` is the rendered text, with whitespace normalised
    # (a sampled vertical tab or trailing space would not compare equal to what was stored).
    answer_a = browser.find_element(By.ID, "answer-a").get_property("textContent")
    answer_b = browser.find_element(By.ID, "answer-b").get_property("textContent")
    assert answer_a and answer_b and "…" not in (answer_a, answer_b)
    assert browser.find_element(By.ID, "error").text == ""
    assert "base" not in browser.find_element(By.ID, "reveal").text  # nothing revealed yet

    browser.find_element(*vote_a).click()
    wait.until(lambda d: d.find_element(By.ID, "reveal").text.startswith("A was "))
    reveal = browser.find_element(By.ID, "reveal").text
    winner = reveal.split("A was ")[1].split(",")[0]
    assert winner in ("base", "tuned")

    # The leaderboard on the page shows the vote, and agrees with the API.
    row = (By.CSS_SELECTOR, f"#leaderboard tr[data-model='{winner}'] td:nth-child(4)")
    wait.until(lambda d: d.find_element(*row).text == "1")
    board = Client(served).get("/v1/arena/leaderboard").json()
    assert board["votes"] == 1 and board["counts"][winner] == 1
    assert "1 votes" in browser.find_element(By.ID, "summary").text

    # The answers shown were the ones stored, in the order shown.
    exported = Client(served).get("/v1/arena/export", params={"format": "fastchat"}).json()
    assert exported["conversation_a"][-1]["content"] == answer_a
    assert exported["conversation_b"][-1]["content"] == answer_b
    # Voting buttons are off until the next battle.
    assert not browser.find_element(*vote_a).is_enabled()
