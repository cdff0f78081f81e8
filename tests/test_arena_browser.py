"""The arena page in the system's headless Chromium, driven by selenium against the real app:
set the key, type a prompt, watch two anonymous answers stream in side by side, ask a follow-up
that both models continue, vote on the whole conversation, see the names and the leaderboard,
and start a new battle.

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
            # Long enough answers that the text visibly arrives in pieces.
            "serve.default_max_new_tokens=24",
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


# Records, per pane, every text an answer showed while it was written: setting an element's
# textContent replaces its text node, so each added text node is one state the voter saw.
WATCH_ANSWERS = """
window.answerStates = {A: [], B: []};
for (const side of ["A", "B"]) {
  new MutationObserver((records) => {
    for (const r of records) {
      if (!r.target.classList || !r.target.classList.contains("assistant")) continue;
      for (const node of r.addedNodes) {
        if (node.nodeType === Node.TEXT_NODE) window.answerStates[side].push(node.data);
      }
    }
  }).observe(document.getElementById("conversation-" + side.toLowerCase()), {childList: true, subtree: true});
}
"""


def conversation(browser: Any, side: str) -> list[dict[str, str]]:
    """The messages a pane shows, as {"role", "content"}, with the exact text the page set (`.text`
    is the rendered text with whitespace normalised, which a sampled tab would not survive)."""
    from selenium.webdriver.common.by import By

    messages = browser.find_elements(By.CSS_SELECTOR, f"#conversation-{side.lower()} .msg")
    return [
        {
            "role": "user" if "user" in m.get_attribute("class").split() else "assistant",
            "content": m.get_property("textContent"),
        }
        for m in messages
    ]


def test_arena_page_multi_turn_battle_vote_and_leaderboard(served: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(served + "/arena")
    assert "arena" in browser.title
    prompt, send = (By.ID, "prompt"), (By.ID, "send")
    vote_a = (By.CSS_SELECTOR, "#votes button[data-winner='A']")
    first, follow_up = "Suggest a title for a video about bread", "Make it shorter"

    # Without the key the server refuses, the page says so and shows no half turn.
    browser.find_element(*prompt).send_keys(first)
    browser.find_element(*send).click()
    wait.until(lambda d: "401" in d.find_element(By.ID, "error").text)
    assert conversation(browser, "A") == conversation(browser, "B") == []
    assert browser.find_element(*prompt).get_property("value") == first  # kept to retry

    # First turn: both answers stream into their panes.
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.ID, "save-key").click()
    browser.execute_script(WATCH_ANSWERS)
    browser.find_element(*send).click()
    wait.until(lambda d: "Turn 1 stored" in d.find_element(By.ID, "status").text)
    wait.until(ec.element_to_be_clickable(vote_a))
    assert browser.find_element(By.ID, "error").text == ""
    shown_1 = {side: conversation(browser, side) for side in "AB"}
    answers_1 = {}
    for side in "AB":
        assert [m["role"] for m in shown_1[side]] == ["user", "assistant"]
        assert shown_1[side][0]["content"] == first
        answers_1[side] = shown_1[side][1]["content"]
    states = browser.execute_script("return window.answerStates")
    for side in "AB":
        # Every state shown was a beginning of the final answer, growing to it.
        assert all(answers_1[side].startswith(state) for state in states[side]), states
        assert states[side] == sorted(states[side], key=len)
        assert not states[side] or states[side][-1] == answers_1[side]
    # Streamed, not filled in at the end: the text arrived in more pieces than one per pane.
    assert len(states["A"]) + len(states["B"]) > 2, states
    assert "base" not in browser.find_element(By.ID, "reveal").text  # nothing revealed yet

    # Second turn: a follow-up that both panes continue.
    assert browser.find_element(*send).text == "Send follow-up"
    assert browser.find_element(*prompt).get_property("value") == ""
    browser.find_element(*prompt).send_keys(follow_up)
    browser.find_element(*send).click()
    wait.until(lambda d: "Turn 2 stored" in d.find_element(By.ID, "status").text)
    wait.until(ec.element_to_be_clickable(vote_a))
    shown = {side: conversation(browser, side) for side in "AB"}
    for side in "AB":
        assert shown[side][:2] == shown_1[side]
        assert [m["role"] for m in shown[side]] == ["user", "assistant", "user", "assistant"]
        assert shown[side][2]["content"] == follow_up
    assert "base" not in browser.find_element(By.ID, "reveal").text

    # The vote judges the whole conversation; then the names are shown.
    browser.find_element(*vote_a).click()
    wait.until(lambda d: d.find_element(By.ID, "reveal").text.startswith("A was "))
    reveal = browser.find_element(By.ID, "reveal").text
    winner = reveal.split("A was ")[1].split(",")[0]
    loser = reveal.split("B was ")[1].rstrip(".")
    assert sorted([winner, loser]) == ["base", "tuned"]

    # The leaderboard on the page shows the vote, and agrees with the API.
    row = (By.CSS_SELECTOR, f"#leaderboard tr[data-model='{winner}'] td:nth-child(4)")
    wait.until(lambda d: d.find_element(*row).text == "1")
    board = Client(served).get("/v1/arena/leaderboard").json()
    assert board["votes"] == 1 and board["counts"][winner] == 1
    assert browser.find_element(By.ID, "summary").text.startswith("1 vote. ")

    # What the panes showed is what was stored, whole conversations in the order shown.
    exported = Client(served).get("/v1/arena/export", params={"format": "fastchat"}).json()
    assert (exported["model_a"], exported["model_b"], exported["turn"]) == (winner, loser, 2)
    assert exported["conversation_a"] == shown["A"]
    assert exported["conversation_b"] == shown["B"]
    # A voted battle takes no more votes or turns; a new battle starts from nothing.
    assert not browser.find_element(*vote_a).is_enabled()
    assert not browser.find_element(*send).is_enabled()
    browser.find_element(By.ID, "new-battle").click()
    assert conversation(browser, "A") == conversation(browser, "B") == []
    assert browser.find_element(By.ID, "reveal").text == ""
    assert browser.find_element(*send).text == "Get two answers"

    # A second, one-turn battle: a fresh id (the old one is voted), and the count reads "2 votes".
    browser.find_element(*prompt).send_keys("Name a fruit")
    browser.find_element(*send).click()
    wait.until(lambda d: "Turn 1 stored" in d.find_element(By.ID, "status").text)
    wait.until(ec.element_to_be_clickable(vote_a))
    assert [m["role"] for m in conversation(browser, "A")] == ["user", "assistant"]
    browser.find_element(By.CSS_SELECTOR, "#votes button[data-winner='tie']").click()
    wait.until(lambda d: d.find_element(By.ID, "summary").text.startswith("2 votes. "))
    assert Client(served).get("/v1/arena/leaderboard").json()["counts"]["tie"] == 1


def test_arena_page_judges_a_queued_pair(served: str, browser: Any) -> None:
    """Two answers queued over HTTP (a preference round's candidates) are shown as a battle, take
    a vote but no follow-up, and the vote is what the queue's battle state then reports."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    client = Client(served)
    posted = client.post(
        "/v1/arena/queue",
        {
            "messages": [{"role": "user", "content": "Title my knitting video"}],
            "answers": {"x": "Knit Along", "y": "Yarn"},
        },
    )
    assert posted.status_code == 200, posted.text
    battle_id = posted.json()["battle_id"]
    browser.get(served + "/arena")  # the key is kept for this tab from the test before
    wait = WebDriverWait(browser, 60)
    browser.find_element(By.ID, "queued").click()
    wait.until(lambda d: "A queued pair" in d.find_element(By.ID, "status").text)
    shown = {side: conversation(browser, side) for side in ("A", "B")}
    for side in ("A", "B"):
        assert shown[side][0] == {"role": "user", "content": "Title my knitting video"}
    assert sorted(shown[s][1]["content"] for s in ("A", "B")) == ["Knit Along", "Yarn"]
    assert not browser.find_element(By.ID, "send").is_enabled()  # a queued pair is not continued
    vote_a = (By.CSS_SELECTOR, "#votes button[data-winner='A']")
    wait.until(ec.element_to_be_clickable(vote_a))
    browser.find_element(*vote_a).click()
    wait.until(lambda d: d.find_element(By.ID, "reveal").text.startswith("A was queued:"))
    state = client.get(f"/v1/arena/battles/{battle_id}").json()
    assert state["voted"] and state["winner"] == "A"
    assert state["answers"]["A"] == shown["A"][1]["content"]
    browser.find_element(By.ID, "queued").click()
    wait.until(lambda d: "No queued pairs" in d.find_element(By.ID, "status").text)
