"""The labelling page served at / by the feedback service: one self-contained HTML document.

Keys: S = success, F = failure, Enter = submit the score slider's value. The token, when the service
needs one, comes from the address's fragment (http://host:port/#token=...), which browsers never send.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vlarl: label episodes</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5rem; background: #f6f7f9; color: #1d2330; }
 main { display: flex; gap: 2rem; align-items: flex-start; }
 #current { background: #fff; padding: 1rem 1.25rem; border-radius: 8px; box-shadow: 0 1px 3px #0002; }
 #instruction { font-size: 1.25rem; margin: .25rem 0 .75rem; }
 video { width: 320px; height: 320px; background: #000; image-rendering: pixelated; border-radius: 4px; }
 .row { display: flex; gap: .5rem; align-items: center; margin-top: .75rem; }
 button { font-size: 1rem; padding: .45rem .9rem; border-radius: 6px; border: 1px solid #aab; cursor: pointer; }
 #btn-success { background: #d8f5dd; } #btn-failure { background: #fadcdc; }
 #queue { background: #fff; padding: .75rem 1rem; border-radius: 8px; min-width: 16rem; box-shadow: 0 1px 3px #0002; }
 #queue li.active { font-weight: 600; } kbd { border: 1px solid #aab; border-radius: 3px; padding: 0 .3rem; }
 #status { color: #556; margin-top: .5rem; min-height: 1.2rem; }
</style></head>
<body>
<h1>Label episodes</h1>
<main>
 <section id="current">
  <div>Instruction:</div><div id="instruction">waiting for episodes...</div>
  <video id="video" muted autoplay loop playsinline controls></video>
  <div class="row"><button id="btn-success">Success <kbd>S</kbd></button>
   <button id="btn-failure">Failure <kbd>F</kbd></button></div>
  <div class="row"><label for="score">Score</label>
   <input id="score" type="range" min="-1" max="1" step="0.1" value="0">
   <output id="score-value">0.0</output><button id="btn-score">Submit score <kbd>Enter</kbd></button></div>
  <div id="status"></div>
 </section>
 <section><h2>Queue (<span id="count">0</span>)</h2><ol id="queue"></ol></section>
</main>
<script>
const token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
const auth = token ? {"Authorization": "Bearer " + token} : {};
const q = token ? "?token=" + encodeURIComponent(token) : "";
let queue = [], current = null;
const $ = (id) => document.getElementById(id);

function show() {
  if (current && !queue.some(e => e.episode_id === current)) current = null;
  if (!current && queue.length) current = queue[0].episode_id;
  const ep = queue.find(e => e.episode_id === current);
  $("count").textContent = queue.length;
  $("queue").innerHTML = "";
  for (const e of queue) {
    const li = document.createElement("li");
    li.textContent = e.episode_id + ": " + e.instruction;
    li.dataset.episode = e.episode_id;
    if (e.episode_id === current) li.className = "active";
    li.onclick = () => { current = e.episode_id; show(); };
    $("queue").appendChild(li);
  }
  $("instruction").textContent = ep ? ep.instruction : "waiting for episodes...";
  $("current").dataset.episode = ep ? ep.episode_id : "";
  const src = ep && ep.has_video ? "/videos/" + encodeURIComponent(ep.episode_id) + q : "";
  if ($("video").dataset.src !== src) {
    $("video").dataset.src = src;
    if (src) { $("video").src = src; $("video").play().catch(() => {}); } else { $("video").removeAttribute("src"); }
  }
}

async function label(body) {
  if (!current) return;
  body.episode_id = current;
  const r = await fetch("/api/labels", {method: "POST", headers: {"Content-Type": "application/json", ...auth},
                                         body: JSON.stringify(body)});
  const out = await r.json();
  $("status").textContent = r.ok ? "labelled " + out.episode_id + ": " + out.score : "not stored: " + out.error;
  queue = queue.filter(e => e.episode_id !== body.episode_id);
  current = null;
  show();
}

$("btn-success").onclick = () => label({label: "success"});
$("btn-failure").onclick = () => label({label: "failure"});
$("btn-score").onclick = () => label({score: parseFloat($("score").value)});
$("score").oninput = () => { $("score-value").textContent = parseFloat($("score").value).toFixed(1); };
document.addEventListener("keydown", (e) => {
  if (e.key === "s" || e.key === "S") label({label: "success"});
  else if (e.key === "f" || e.key === "F") label({label: "failure"});
  else if (e.key === "Enter") label({score: parseFloat($("score").value)});
});

function connect() {
  const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws" + q);
  ws.onmessage = (m) => { const d = JSON.parse(m.data); if (d.type === "queue") { queue = d.queue; show(); } };
  ws.onclose = () => setTimeout(connect, 1000);
}
connect();
</script>
</body></html>
"""
