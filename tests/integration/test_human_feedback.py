"""Human feedback end to end: the real service (child process, real HTTP), a real headless Chromium
from Debian's packages driven by Selenium, and a toy training run whose rewards are the labels."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from vlarl.data.video import write_video
from vlarl.rewards.human import FeedbackService
from vlarl.rewards.store import LabelStore

pytestmark = pytest.mark.integration

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (bash launch/setup.sh dev installs them as root)")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (bash launch/setup.sh dev installs them as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,760",
                "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def raw(url: str, method="GET", body: bytes | None = None, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers, method=method), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def offer(service: FeedbackService, episode_id: str, instruction: str, frames: int = 12) -> None:
    rng = np.random.default_rng(0)
    write_video(rng.integers(0, 255, (frames, 16, 16, 3), dtype=np.uint8), service.videos / f"{episode_id}.mp4")
    service.call("POST", "/api/episodes", {"episode_id": episode_id, "instruction": instruction,
                                           "video": f"{episode_id}.mp4", "weights_version": 7, "env_reward": 0.0})


def current_episode(browser) -> str:
    return browser.find_element("id", "current").get_attribute("data-episode")


@needs_browser
def test_page_plays_the_video_and_a_click_stores_the_label(browser, tmp_path):
    service = FeedbackService(tmp_path, "run-a", "127.0.0.1", 0).start()
    try:
        offer(service, "it000000-ep0000", "pick up the red block")
        offer(service, "it000000-ep0001", "pick up the blue block")
        browser.get(service.url)
        wait_for(lambda: current_episode(browser) == "it000000-ep0000", what="the first episode on the page")
        assert browser.find_element("id", "instruction").text == "pick up the red block"
        assert browser.find_element("id", "count").text == "2"
        # The video element really plays: enough data to play, and its clock moves.
        video = "return [document.getElementById('video').readyState, document.getElementById('video').currentTime]"
        wait_for(lambda: browser.execute_script(video)[0] >= 3, what="video readyState >= 3")
        t0 = browser.execute_script(video)[1]
        wait_for(lambda: browser.execute_script(video)[1] != t0, timeout=10, what="video currentTime to advance")
        assert browser.execute_script("return document.getElementById('video').error") is None

        browser.find_element("id", "btn-success").click()
        wait_for(lambda: service.call("GET", "/api/labels?ids=it000000-ep0000")["labels"], what="the stored label")
        assert service.call("GET", "/api/labels?ids=it000000-ep0000,it000000-ep0001")["labels"] == {
            "it000000-ep0000": 1.0}
        # The keyboard works too: F labels the next episode a failure.
        wait_for(lambda: current_episode(browser) == "it000000-ep0001", what="the second episode")
        browser.find_element("tag name", "body").send_keys("f")
        wait_for(lambda: len(service.call("GET", "/api/labels?ids=it000000-ep0001")["labels"]) == 1,
                 what="the keyboard label")
        assert service.call("GET", "/api/labels?ids=it000000-ep0001")["labels"] == {"it000000-ep0001": 0.0}
        wait_for(lambda: browser.find_element("id", "count").text == "0", what="an empty queue on the page")
    finally:
        service.stop()
    rows = LabelStore(tmp_path / "labels.sqlite", "run-a").db.execute(
        "SELECT episode_id, score, kind, weights_version FROM labels ORDER BY episode_id").fetchall()
    assert rows == [("it000000-ep0000", 1.0, "success", 7), ("it000000-ep0001", 0.0, "failure", 7)]


def test_restart_keeps_labels_and_no_episode_is_labelled_twice(tmp_path):
    service = FeedbackService(tmp_path, "run-b", "127.0.0.1", 0).start()
    try:
        offer(service, "it000001-ep0003", "open the drawer")
        status, _ = raw(service.url + "api/labels", "POST", b'{"episode_id": "it000001-ep0003", "score": -0.4}')
        assert status == 200
        service.proc.kill()  # a crash, not a clean stop
        service.proc.wait()
        service.start()
        assert service.call("GET", "/api/labels?ids=it000001-ep0003")["labels"] == {"it000001-ep0003": -0.4}
        status, out = raw(service.url + "api/labels", "POST", b'{"episode_id": "it000001-ep0003", "score": 1}')
        assert status == 409 and "already labelled" in out["error"]
        offer(service, "it000001-ep0003", "open the drawer")  # a restarted trainer offering it again
        assert service.call("GET", "/api/queue")["queue"] == []  # is not asked again
        status, out = raw(service.url + "api/labels", "POST", b'{"episode_id": "it999999-ep0000", "label": "success"}')
        assert status == 404 and "not known" in out["error"]
    finally:
        service.stop()


def test_token_and_bad_requests(tmp_path):
    service = FeedbackService(tmp_path, "run-c", "0.0.0.0", 0).start()  # not loopback: a token is required
    try:
        assert service.token and len(service.token) >= 24
        url = f"http://127.0.0.1:{service.bound}/"
        assert raw(url + "api/health")[0] == 401
        assert raw(url + "api/health", token="wrong-token")[0] == 401
        assert raw(url + f"api/queue?token=wrong")[0] == 401
        assert raw(url + "api/health", token=service.token)[0] == 200
        offer(service, "it000002-ep0000", "close the drawer")
        assert raw(url + "videos/it000002-ep0000", token=None)[0] == 401
        status, out = raw(url + "api/labels", "POST", b'{"episode_id": "it000002-ep0000", "score": ', service.token)
        assert status == 400 and "not valid JSON" in out["error"]
        status, _ = raw(url + "api/labels", "POST", b'{"episode_id": "it000002-ep0000", "score": 3}', service.token)
        assert status == 422
        status, _ = raw(url + "api/labels", "POST", b"[" + b"1," * 40_000 + b"1]", service.token)
        assert status == 413
        status, out = raw(url + "api/labels", "POST", b'{"episode_id": "it000002-ep0000", "label": "success"}',
                          service.token)
        assert status == 200 and out["score"] == 1.0 and service.proc.poll() is None
    finally:
        service.stop()


@needs_browser
def test_toy_run_rewards_are_the_labels_given_in_the_browser(ray_local, browser, tmp_path):
    from vlarl.config import load_config
    from vlarl.trainer import train

    port = free_port()
    cfg = load_config([f"trainer.run_dir={tmp_path}", "trainer.iterations=1", "env=toy", "rollout.num_envs=4",
                       "algo.minibatch_size=16", "algo.epochs=1", "rollout.eval_every=0", "cluster.dashboard=false",
                       "reward=human", f"reward.port={port}", "reward.human_timeout=240"])
    result, errors = {}, []

    def run():
        try:
            result.update(train(cfg))
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    trainer = threading.Thread(target=run, daemon=True)
    trainer.start()
    page = f"http://127.0.0.1:{port}/"
    wait_for(lambda: errors or _page_ready(browser, page), timeout=120, what="the labelling page of the run")
    assert not errors, errors
    given = {}
    for k in range(4):
        episode = wait_for(lambda: errors or current_episode(browser), timeout=60, what=f"episode {k} on the page")
        assert not errors, errors
        if k == 0:
            browser.find_element("id", "btn-success").click()
            given[episode] = 1.0
        elif k == 1:
            browser.find_element("id", "btn-failure").click()
            given[episode] = 0.0
        else:  # a score: move the slider, then Enter
            value = -0.5 if k == 2 else 0.3
            browser.execute_script(f"document.getElementById('score').value = {value}")
            browser.find_element("tag name", "body").send_keys("\n")
            given[episode] = value
        wait_for(lambda: current_episode(browser) != episode, timeout=30, what="the page to move on")
    trainer.join(timeout=180)
    assert not trainer.is_alive() and not errors, errors
    assert sorted(given) == [f"it000000-ep{i:04d}" for i in range(4)]

    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["reward/human_timeouts"] == 0 and row["reward/human_labels"] == 4
    # mean of 1, 0, -0.5, 0.3 = 0.2: no mix of the toy's 0/1 rewards over 4 episodes gives that
    assert row["rollout/return"] == pytest.approx(np.mean(list(given.values())), abs=1e-6)
    assert result["rollout/return"] == pytest.approx(row["rollout/return"])
    store = LabelStore(tmp_path / "feedback" / "labels.sqlite", tmp_path.name)
    assert store.labels(list(given)) == pytest.approx(given)


def _page_ready(browser, url) -> bool:
    try:
        browser.get(url)
    except Exception:  # the service is not listening yet
        return False
    return "Label episodes" in browser.page_source
