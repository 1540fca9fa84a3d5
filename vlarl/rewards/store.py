"""Labels on disk: one SQLite file per run, written by the feedback service (or the console mode).

Every episode offered for labelling and every label carry (run id, episode id, weights version);
(run id, episode id) is the key of both tables, so a restarted trainer re-offering an episode finds
its label instead of asking again, and no episode is ever labelled twice.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS episodes (
    run_id TEXT NOT NULL, episode_id TEXT NOT NULL, instruction TEXT NOT NULL, video TEXT,
    weights_version INTEGER NOT NULL, env_reward REAL NOT NULL, state TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (run_id, episode_id));
CREATE TABLE IF NOT EXISTS labels (
    run_id TEXT NOT NULL, episode_id TEXT NOT NULL, score REAL NOT NULL, kind TEXT NOT NULL,
    weights_version INTEGER NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (run_id, episode_id));
"""


class LabelError(ValueError):
    """A label that cannot be stored: `status` is the HTTP status that says why (404, 409, 422)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class LabelStore:
    def __init__(self, path: Path, run_id: str):
        self.run_id = run_id
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()

    def offer(self, episode_id: str, instruction: str, video: str | None, weights_version: int,
              env_reward: float) -> None:
        """Queue an episode for labelling; one already labelled stays labelled, one given up on waits again."""
        with self.lock:
            self.db.execute(
                "INSERT INTO episodes VALUES (?, ?, ?, ?, ?, ?, 'waiting', ?) ON CONFLICT (run_id, episode_id) DO "
                "UPDATE SET state = 'waiting', video = excluded.video WHERE state = 'expired'",
                (self.run_id, episode_id, instruction, video, weights_version, env_reward, time.time()))
            self.db.execute("UPDATE episodes SET state = 'labelled' WHERE run_id = ? AND episode_id = ? AND EXISTS "
                            "(SELECT 1 FROM labels l WHERE l.run_id = ? AND l.episode_id = ?)",
                            (self.run_id, episode_id, self.run_id, episode_id))

    def expire(self, episode_ids: list[str]) -> None:
        """The trainer stopped waiting for these: they leave the queue and take no label."""
        with self.lock:
            self.db.executemany("UPDATE episodes SET state = 'expired' WHERE run_id = ? AND episode_id = ? "
                                "AND state = 'waiting'", [(self.run_id, e) for e in episode_ids])

    def label(self, episode_id: str, score: float, kind: str) -> dict:
        with self.lock:
            row = self.db.execute("SELECT state, weights_version FROM episodes WHERE run_id = ? AND episode_id = ?",
                                  (self.run_id, episode_id)).fetchone()
            if row is None:
                raise LabelError(404, f"episode {episode_id!r} is not known to run {self.run_id!r}.")
            if row[0] == "labelled":
                raise LabelError(409, f"episode {episode_id!r} is already labelled.")
            if row[0] == "expired":
                raise LabelError(409, f"episode {episode_id!r} is no longer waiting (the trainer timed out).")
            self.db.execute("INSERT INTO labels VALUES (?, ?, ?, ?, ?, ?)",
                            (self.run_id, episode_id, score, kind, row[1], time.time()))
            self.db.execute("UPDATE episodes SET state = 'labelled' WHERE run_id = ? AND episode_id = ?",
                            (self.run_id, episode_id))
        return {"episode_id": episode_id, "score": score, "kind": kind, "weights_version": row[1]}

    def labels(self, episode_ids: list[str]) -> dict[str, float]:
        """{episode id: score} of those labelled so far."""
        with self.lock:
            marks = ",".join("?" * len(episode_ids))
            rows = self.db.execute(f"SELECT episode_id, score FROM labels WHERE run_id = ? AND episode_id IN ({marks})",
                                   (self.run_id, *episode_ids)).fetchall()
        return dict(rows)

    def queue(self) -> list[dict]:
        """Episodes waiting for a label, oldest first."""
        with self.lock:
            rows = self.db.execute("SELECT episode_id, instruction, weights_version, video FROM episodes "
                                   "WHERE run_id = ? AND state = 'waiting' ORDER BY created, episode_id",
                                   (self.run_id,)).fetchall()
        return [{"episode_id": e, "instruction": i, "weights_version": v, "has_video": bool(p)} for e, i, v, p in rows]

    def video(self, episode_id: str) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT video FROM episodes WHERE run_id = ? AND episode_id = ?",
                                  (self.run_id, episode_id)).fetchone()
        return row[0] if row else None

    def counts(self) -> dict:
        with self.lock:
            rows = self.db.execute("SELECT state, COUNT(*) FROM episodes WHERE run_id = ? GROUP BY state",
                                   (self.run_id,)).fetchall()
        return {s: n for s, n in rows}

    def close(self) -> None:
        self.db.close()
