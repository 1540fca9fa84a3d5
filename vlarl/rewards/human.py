"""Human feedback: people label a fraction of each iteration's episodes, on a web page or in the console.

The trainer offers the recorded episodes (instruction + video) and waits up to reward.human_timeout
seconds; an episode not labelled by then keeps the environment's reward and counts in
reward/human_timeouts. Labels live in run_dir/feedback/labels.sqlite, keyed by (run id, episode id),
so a restart of the trainer or of the service loses none and never asks twice.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from vlarl.data.video import write_video
from vlarl.rewards import Episode, RewardProvider
from vlarl.rewards.service import LABELS, is_loopback
from vlarl.rewards.store import LabelError, LabelStore

POLL_S = 0.2  # how often the trainer asks the service for new labels


class FeedbackService:
    """The service as a child process of the trainer, and a small HTTP client for it."""

    def __init__(self, folder: Path, run_id: str, host: str, port: int):
        self.folder, self.run_id, self.host, self.port = folder, run_id, host, port
        self.videos = folder / "videos"
        self.videos.mkdir(parents=True, exist_ok=True)
        self.token = None if is_loopback(host) else secrets.token_urlsafe(24)
        self.proc = None
        self.bound = None

    def start(self) -> "FeedbackService":
        ready = self.folder / "service.json"
        ready.unlink(missing_ok=True)
        env = {**os.environ, "VLARL_FEEDBACK_TOKEN": self.token or ""}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vlarl.rewards.service", "--db", str(self.folder / "labels.sqlite"),
             "--videos", str(self.videos), "--run-id", self.run_id, "--host", self.host,
             "--port", str(self.bound or self.port), "--ready", str(ready)], env=env)
        deadline = time.monotonic() + 30
        while not ready.is_file():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the feedback service did not start on {self.host}:{self.port} (exit code "
                                   f"{self.proc.poll()}); see the message above, or choose another reward.port.")
            time.sleep(0.05)
        self.bound = json.loads(ready.read_text())["port"]  # a restart keeps the same port
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.bound}/"

    def ensure_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            print(f"vlarl: the feedback service exited (code {self.proc.returncode}); restarting it", flush=True)
            self.start()

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url.rstrip("/") + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def parse_answer(text: str) -> tuple[float, str] | None:
    """Console answer -> (score, kind): s/success, f/failure, or a number in [-1, 1]; None if not one."""
    text = text.strip().lower()
    for kind in LABELS:
        if text in (kind, kind[0]):
            return LABELS[kind], kind
    try:
        value = float(text)
    except ValueError:
        return None
    return (value, "score") if np.isfinite(value) and abs(value) <= 1 else None


class HumanReward(RewardProvider):
    def __init__(self, rcfg, run_dir: Path):
        self.fraction, self.timeout, self.mode = rcfg.human_fraction, rcfg.human_timeout, rcfg.mode
        self.wants_frames = self.fraction
        self.folder = run_dir / "feedback"
        (self.folder / "videos").mkdir(parents=True, exist_ok=True)
        self.console = (sys.stdin, sys.stdout)  # terminal mode reads answers from and writes prompts to these
        self.last = {}
        self.service, self.store = None, None
        if self.mode == "web":
            self.service = FeedbackService(self.folder, run_dir.name, rcfg.host, rcfg.port).start()
            # The only place the token is ever shown; it is in the fragment, which browsers never send.
            shown = f"{self.service.url}#token={self.service.token}" if self.service.token else self.service.url
            print(f"vlarl: label episodes at {shown}", flush=True)
        else:
            self.store = LabelStore(self.folder / "labels.sqlite", run_dir.name)

    def rewards(self, episodes: list[Episode]) -> list:
        chosen = [e for e in episodes if e.frames is not None]
        for e in chosen:
            write_video(e.frames, self.folder / "videos" / f"{e.episode_id}.mp4")
        ask = self._ask_web if self.mode == "web" else self._ask_console
        labels = ask(chosen) if chosen else {}
        self.last = {"reward/human_labels": float(len(labels)),
                     "reward/human_timeouts": float(len(chosen) - len(labels))}
        return [labels[e.episode_id] if e.episode_id in labels else e.env_rewards for e in episodes]

    def metrics(self) -> dict:
        return dict(self.last)

    def _ask_web(self, chosen: list[Episode]) -> dict[str, float]:
        for e in chosen:
            self._call("POST", "/api/episodes", {"episode_id": e.episode_id, "instruction": e.instruction,
                                                 "video": f"{e.episode_id}.mp4", "weights_version": e.weights_version,
                                                 "env_reward": float(e.env_rewards.sum())})
        ids = [e.episode_id for e in chosen]
        deadline, labels = time.monotonic() + self.timeout, {}
        while True:
            labels = self._call("GET", "/api/labels?ids=" + ",".join(ids)).get("labels", labels)
            if len(labels) == len(ids) or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        self._call("POST", "/api/expire", {"episode_ids": [i for i in ids if i not in labels]})
        return labels

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        """One API call; a dead service is restarted (its labels are on disk) and the call tried again."""
        for attempt in range(3):
            try:
                return self.service.call(method, path, body)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if attempt == 2:
                    raise
                self.service.ensure_running()
                time.sleep(0.5)
        return {}

    def _ask_console(self, chosen: list[Episode]) -> dict[str, float]:
        stdin, stdout = self.console
        for e in chosen:
            self.store.offer(e.episode_id, e.instruction, f"{e.episode_id}.mp4", e.weights_version,
                             float(e.env_rewards.sum()))
        ids = [e.episode_id for e in chosen]
        labels = self.store.labels(ids)
        deadline = time.monotonic() + self.timeout
        for k, e in enumerate(chosen):
            while e.episode_id not in labels and time.monotonic() < deadline:
                stdout.write(f"[{k + 1}/{len(chosen)}] {e.instruction!r}  video: {self.folder / 'videos'}/"
                             f"{e.episode_id}.mp4  env: {'success' if e.success else 'failure'}\n"
                             "  label: s = success, f = failure, or a score in [-1, 1]: ")
                stdout.flush()
                ready, _, _ = select.select([stdin], [], [], max(0.0, deadline - time.monotonic()))
                line = stdin.readline() if ready else ""
                if not line:  # timed out, or the input closed
                    deadline = 0
                    break
                answer = parse_answer(line)
                if answer is None:
                    stdout.write("  not a label; type s, f or a number in [-1, 1]\n")
                    continue
                try:
                    labels[e.episode_id] = self.store.label(e.episode_id, *answer)["score"]
                except LabelError as err:  # labelled meanwhile (by a second console on the same run)
                    stdout.write(f"  {err}\n")
                    labels.update(self.store.labels([e.episode_id]))
        stdout.write("\n")
        self.store.expire([i for i in ids if i not in labels])
        return labels

    def close(self) -> None:
        if self.service is not None:
            self.service.stop()
        if self.store is not None:
            self.store.close()
