"""`atat sample --trace FILE.html`: the denoising trajectory as one self-contained HTML page.

No sampler ever changes a decoded token, so a trajectory is fully described by the final tokens and the step at
which each position was decoded (-1 for given text). The page replays it: a slider (and a play button) over the
steps shows, at step k, every position decoded before k, the ones decoded at k highlighted, and MASK elsewhere;
colours run from early (blue) to late (red) decoding. No external files, scripts or fonts: it opens offline.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Sequence

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>%(title)s</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 68rem; margin: 1.5rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.3rem; margin-bottom: .2rem; }
  .meta { color: #555; font-size: .85rem; margin-bottom: 1rem; }
  .controls { position: sticky; top: 0; background: #fff; padding: .5rem 0; border-bottom: 1px solid #ddd;
              display: flex; gap: .8rem; align-items: center; z-index: 1; }
  .controls input[type=range] { flex: 1; }
  .legend span { padding: 0 .3rem; margin-right: .3rem; border-radius: 3px; font-size: .8rem; }
  .sample { margin: 1rem 0 1.6rem; }
  .sample h2 { font-size: .95rem; color: #444; margin: 0 0 .3rem; }
  .text { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: .85rem; line-height: 1.55;
          white-space: pre-wrap; word-break: break-word; border: 1px solid #eee; padding: .6rem; border-radius: 4px; }
  .t { border-radius: 2px; }
  .given { background: #e4e4e4; }
  .mask { color: #bbb; }
  .now { outline: 2px solid #000; background: #ffe066 !important; }
</style>
</head>
<body>
<h1>%(title)s</h1>
<div class="meta">%(meta)s</div>
<div class="controls">
  <button id="play">play</button>
  <input id="step" type="range" min="0" max="%(num_steps)d" value="%(num_steps)d">
  <span id="label"></span>
</div>
<p class="legend"><span class="given">given text</span><span class="mask">&#9618; still masked</span>
  <span style="background:hsl(220,80%%,85%%)">decoded early</span><span style="background:hsl(0,80%%,85%%)">decoded late</span>
  <span class="now">decoded at this step</span></p>
<div id="samples"></div>
<script>
const DATA = %(data)s;
const MASK_GLYPH = "\\u2592";
const slider = document.getElementById("step"), label = document.getElementById("label");
const root = document.getElementById("samples");
const spans = DATA.samples.map((sample, i) => {
  const box = document.createElement("div"); box.className = "sample";
  const head = document.createElement("h2"); head.textContent = "sample " + i; box.appendChild(head);
  const text = document.createElement("div"); text.className = "text"; box.appendChild(text);
  root.appendChild(box);
  return sample.tokens.map((tok, j) => {
    const s = document.createElement("span"); s.className = "t"; text.appendChild(s);
    return [s, tok, sample.decode_step[j]];
  });
});
function hue(k) { return 220 - 220 * (DATA.num_steps > 1 ? k / (DATA.num_steps - 1) : 0); }
function render(done) {
  label.textContent = "step " + done + " / " + DATA.num_steps;
  for (const sample of spans) for (const [s, tok, k] of sample) {
    if (k < 0) { s.className = "t given"; s.textContent = tok; s.style.background = ""; }
    else if (k < done) {
      s.className = k === done - 1 ? "t now" : "t"; s.textContent = tok;
      s.style.background = "hsl(" + hue(k) + ",80%%,85%%)";
    } else { s.className = "t mask"; s.textContent = MASK_GLYPH; s.style.background = ""; }
  }
}
slider.addEventListener("input", () => render(+slider.value));
let timer = null;
document.getElementById("play").addEventListener("click", () => {
  if (timer) { clearInterval(timer); timer = null; return; }
  if (+slider.value >= DATA.num_steps) slider.value = 0;
  const delta = Math.max(1, Math.round(DATA.num_steps / 200));
  timer = setInterval(() => {
    slider.value = Math.min(DATA.num_steps, +slider.value + delta); render(+slider.value);
    if (+slider.value >= DATA.num_steps) { clearInterval(timer); timer = null; }
  }, 40);
});
render(+slider.value);
</script>
</body>
</html>
"""


def write_trace_html(
    path: str | Path,
    samples: Sequence[dict[str, Any]],
    num_steps: int,
    title: str = "atat sample: denoising trajectory",
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write the page. Each sample: {"tokens": [str per position], "decode_step": [int per position]}."""
    data = {
        "num_steps": int(num_steps),
        "samples": [{"tokens": list(s["tokens"]), "decode_step": [int(k) for k in s["decode_step"]]} for s in samples],
    }
    # JSON inside <script>: escape "</" so that no token text can close the script element.
    blob = json.dumps(data, ensure_ascii=True).replace("</", "<\\/")
    meta_text = " &middot; ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in (meta or {}).items())
    page = _PAGE % {"title": html.escape(title), "meta": meta_text, "num_steps": int(num_steps), "data": blob}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
