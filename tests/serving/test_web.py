"""The Gradio web chat in headless Chromium: type a message, watch the answer stream in, compare with the engine.

Needs Debian's `chromium` and `chromium-driver` packages, and `selenium` and `gradio` from PyPI; skipped
(with the reason) when any is missing.
"""

from __future__ import annotations

import re
import shutil

import pytest

pytest.importorskip("uvicorn", reason="serving needs the 'serve' extras (pip install -e '.[serve]')")

from tests.serving.live_server import API_KEY, start_server  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]

# Records every text the newest bot message shows, so the test can tell a streamed answer from one that
# appeared at once.
WATCH_BOT_MESSAGES = """
window.__botTexts = [];
const root = document.querySelector('#chatbot');
new MutationObserver(() => {
  const bots = root.querySelectorAll('[data-testid="bot"]');
  if (!bots.length) return;
  const text = bots[bots.length - 1].innerText;
  const seen = window.__botTexts;
  if (seen[seen.length - 1] !== text) seen.push(text);
}).observe(root, {subtree: true, childList: true, characterData: true});
"""


def squash(text: str) -> str:
    """Rendered text without whitespace: markdown rendering may add or fold line breaks."""
    return re.sub(r"\s+", "", text)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install -y chromium chromium-driver)")
    pytest.importorskip(
        "selenium", reason="the browser test drives Chromium with selenium (pip install selenium)"
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def ui_server(engine):
    pytest.importorskip("gradio", reason="the web chat needs gradio (pip install gradio)")
    from glmtune.serving.api import create_app

    live = start_server(create_app(engine, model_name="tiny-web", ui_path="/chat"))
    yield live
    live.stop()


def bot_texts(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [
        el.get_attribute("innerText")
        for el in driver.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')
    ]


def send_and_read(driver, message: str, turn: int, timeout: float = 120) -> list[str]:
    """Send a message; wait for the `turn`-th answer to stop changing; every text it showed on the way."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("window.__botTexts = [];")
    box = driver.find_element(By.CSS_SELECTOR, "#message textarea")
    box.send_keys(message)
    box.send_keys(Keys.ENTER)
    # Generation is over once the submit button is back (Gradio shows a stop button meanwhile).
    WebDriverWait(driver, timeout).until(lambda d: len(bot_texts(d)) >= turn)
    WebDriverWait(driver, timeout).until(
        lambda d: (
            not d.find_elements(By.CSS_SELECTOR, "#chatbot .pending, .stop-button:not(.hidden)")
            and d.execute_script("return document.querySelector('#message textarea').disabled") is False
        )
    )
    return driver.execute_script("return window.__botTexts")


def test_web_chat_streams_the_engines_answers(ui_server, browser, engine):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{ui_server.url}/chat/")
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#message textarea"))
    browser.execute_script(WATCH_BOT_MESSAGES)

    first, history = engine.chat("你好")
    seen = send_and_read(browser, "你好", turn=1)
    WebDriverWait(browser, 60).until(lambda d: squash(bot_texts(d)[0]) == squash(first))
    growing = [squash(t) for t in seen if squash(t)]
    assert all(squash(first).startswith(t) for t in growing), growing
    assert len(set(growing)) >= 2, f"the answer appeared in one piece, not streamed: {seen}"

    # The second turn has the first as its history.
    second, _ = engine.chat("北京在哪里", history)
    send_and_read(browser, "北京在哪里", turn=2)
    WebDriverWait(browser, 60).until(
        lambda d: len(bot_texts(d)) == 2 and squash(bot_texts(d)[1]) == squash(second)
    )


def test_web_chat_with_an_api_key_asks_for_it(engine):
    """With --api-key the page is a login (the key is the password) and the API still needs the header."""
    pytest.importorskip("gradio", reason="the web chat needs gradio (pip install gradio)")
    import httpx

    from glmtune.serving.api import create_app

    live = start_server(create_app(engine, model_name="tiny-web", api_key=API_KEY, ui_path="/chat"))
    try:
        assert httpx.get(f"{live.url}/chat/", timeout=30).status_code == 200
        assert httpx.get(f"{live.url}/chat/config", timeout=30).status_code == 401
        assert httpx.get(f"{live.url}/v1/models", timeout=30).status_code == 401
        wrong = httpx.post(f"{live.url}/chat/login", data={"username": "me", "password": "nope"}, timeout=30)
        assert wrong.status_code >= 400
        with httpx.Client(base_url=live.url, timeout=30) as session:
            ok = session.post("/chat/login", data={"username": "me", "password": API_KEY})
            assert ok.status_code == 200, ok.text
            assert session.get("/chat/config").status_code == 200
    finally:
        live.stop()
