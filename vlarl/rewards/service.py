"""The feedback service: a small web page and an HTTP + WebSocket API over the run's label store.

    python -m vlarl.rewards.service --db RUN/feedback/labels.sqlite --videos RUN/feedback/videos \
        --run-id NAME [--host 127.0.0.1] [--port 0] [--ready FILE]

The trainer starts it as a child process (vlarl.rewards.human) and talks to it over HTTP. It binds
127.0.0.1 unless told otherwise; bound elsewhere it needs the bearer token in VLARL_FEEDBACK_TOKEN
(the trainer generates one) on every API, video and WebSocket request, as `Authorization: Bearer`
or `?token=` (a <video> element cannot send headers). Bad requests get a 4xx and change nothing.

API (JSON):
    GET  /api/health                    {run_id, counts}
    GET  /api/queue                     {queue: [{episode_id, instruction, weights_version, has_video}]}
    POST /api/episodes                  {episode_id, instruction, video, weights_version, env_reward}  (trainer)
    POST /api/expire                    {episode_ids: [...]}                                            (trainer)
    GET  /api/labels?ids=a,b            {labels: {episode_id: score}}                                   (trainer)
    POST /api/labels                    {episode_id, label: success|failure} or {episode_id, score: -1..1}
    GET  /videos/{episode_id}           the episode's video
    GET  /ws                            pushes {type: queue, queue}; takes {type: label, ...} like POST /api/labels
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import math
import os
import re
import sys
from pathlib import Path

from aiohttp import WSMsgType, web

from vlarl.rewards.page import PAGE
from vlarl.rewards.store import LabelError, LabelStore

MAX_BODY = 64 * 1024  # bytes; every request body is small JSON (videos are written to disk by the trainer)
EPISODE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
LABELS = {"success": 1.0, "failure": 0.0}  # the environment's sparse reward uses the same two values


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bad(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def parse_label(body) -> tuple[str, float, str]:
    """(episode id, score, kind) of a label request; LabelError(400/422) when malformed."""
    if not isinstance(body, dict):
        raise LabelError(400, "the body must be a JSON object.")
    episode_id = body.get("episode_id")
    if not isinstance(episode_id, str) or not EPISODE_ID.match(episode_id):
        raise LabelError(400, "episode_id must be a string of letters, digits, '.', '_' or '-'.")
    if "label" in body:
        if body["label"] not in LABELS:
            raise LabelError(422, "label must be 'success' or 'failure'.")
        return episode_id, LABELS[body["label"]], body["label"]
    score = body.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) or abs(score) > 1:
        raise LabelError(422, "give label 'success'/'failure' or a score, a number in [-1, 1].")
    return episode_id, float(score), "score"


def make_app(store: LabelStore, videos: Path, token: str | None) -> web.Application:
    sockets: set = set()

    @web.middleware
    async def errors_and_auth(request: web.Request, handler):
        protected = request.path.startswith(("/api/", "/videos/")) or request.path == "/ws"
        if token and protected:
            given = request.headers.get("Authorization", "")
            given = given[7:] if given.startswith("Bearer ") else request.query.get("token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return bad(401, "missing or wrong bearer token.")
        try:
            return await handler(request)
        except web.HTTPException as e:  # 404 route, 405 method, 413 body too large
            return bad(e.status, e.reason)
        except LabelError as e:
            return bad(e.status, str(e))

    async def read_json(request: web.Request):
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise LabelError(413, f"request bodies are limited to {MAX_BODY} bytes.")
        try:
            return json.loads(await request.read())
        except web.HTTPRequestEntityTooLarge:
            raise LabelError(413, f"request bodies are limited to {MAX_BODY} bytes.") from None
        except (ValueError, UnicodeDecodeError):
            raise LabelError(400, "the body is not valid JSON.") from None

    async def broadcast():
        message = json.dumps({"type": "queue", "queue": store.queue()})
        for ws in list(sockets):
            try:
                await ws.send_str(message)
            except (ConnectionError, RuntimeError):
                sockets.discard(ws)

    async def page(request):
        return web.Response(text=PAGE, content_type="text/html")

    async def health(request):
        return web.json_response({"run_id": store.run_id, "counts": store.counts()})

    async def queue(request):
        return web.json_response({"queue": store.queue()})

    async def offer(request):
        body = await read_json(request)
        try:
            episode_id, instruction = body["episode_id"], str(body["instruction"])
            video, version, env_reward = body.get("video"), int(body["weights_version"]), float(body["env_reward"])
        except (KeyError, TypeError, ValueError):
            raise LabelError(400, "an episode needs episode_id, instruction, weights_version and env_reward.") from None
        if not isinstance(episode_id, str) or not EPISODE_ID.match(episode_id):
            raise LabelError(400, "episode_id must be a string of letters, digits, '.', '_' or '-'.")
        if video is not None and (not isinstance(video, str) or Path(video).name != video
                                  or not (videos / video).is_file()):
            raise LabelError(400, f"video must name a file in {videos}.")
        store.offer(episode_id, instruction, video, version, env_reward)
        await broadcast()
        return web.json_response({"ok": True})

    async def expire(request):
        body = await read_json(request)
        ids = body.get("episode_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise LabelError(400, "episode_ids must be a list of strings.")
        store.expire(ids)
        await broadcast()
        return web.json_response({"ok": True})

    async def labels(request):
        ids = [i for i in request.query.get("ids", "").split(",") if i]
        return web.json_response({"labels": store.labels(ids)})

    async def add_label(request):
        stored = store.label(*parse_label(await read_json(request)))
        await broadcast()
        return web.json_response(stored)

    async def video(request):
        name = store.video(request.match_info["episode_id"])
        if not name or not (videos / name).is_file():
            raise LabelError(404, "no video for that episode.")
        return web.FileResponse(videos / name)

    async def websocket(request):
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=MAX_BODY)
        await ws.prepare(request)
        sockets.add(ws)
        await ws.send_str(json.dumps({"type": "queue", "queue": store.queue()}))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    stored = store.label(*parse_label(json.loads(msg.data)))
                except ValueError as e:  # LabelError, or JSON that does not parse
                    await ws.send_str(json.dumps({"type": "error", "status": getattr(e, "status", 400),
                                                  "error": str(e) if isinstance(e, LabelError) else "not valid JSON."}))
                    continue
                await ws.send_str(json.dumps({"type": "labelled", **stored}))
                await broadcast()
        finally:
            sockets.discard(ws)
        return ws

    app = web.Application(middlewares=[errors_and_auth], client_max_size=MAX_BODY)
    app.add_routes([web.get("/", page), web.get("/api/health", health), web.get("/api/queue", queue),
                    web.post("/api/episodes", offer), web.post("/api/expire", expire),
                    web.get("/api/labels", labels), web.post("/api/labels", add_label),
                    web.get("/videos/{episode_id}", video), web.get("/ws", websocket)])
    return app


async def serve(store: LabelStore, videos: Path, host: str, port: int, token: str | None, ready: Path | None):
    import asyncio

    runner = web.AppRunner(make_app(store, videos, token), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    if ready is not None:  # the trainer reads the port from here (port 0 picks a free one)
        tmp = ready.with_name(ready.name + ".tmp")
        tmp.write_text(json.dumps({"port": bound, "pid": os.getpid()}))
        os.replace(tmp, ready)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    import asyncio

    p = argparse.ArgumentParser(prog="python -m vlarl.rewards.service", description=__doc__.split("\n")[0])
    p.add_argument("--db", required=True)
    p.add_argument("--videos", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ready", help="file to write {port, pid} to once listening")
    args = p.parse_args(argv)
    token = os.environ.get("VLARL_FEEDBACK_TOKEN") or None
    if not is_loopback(args.host) and not token:
        print(f"vlarl.feedback: --host {args.host} is reachable from other machines, so a bearer token is required: "
              "set VLARL_FEEDBACK_TOKEN (the trainer does this itself).", file=sys.stderr)
        return 2
    store = LabelStore(Path(args.db), args.run_id)
    try:
        asyncio.run(serve(store, Path(args.videos), args.host, args.port, token,
                          Path(args.ready) if args.ready else None))
    except KeyboardInterrupt:
        pass
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
