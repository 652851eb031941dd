// The igpt serve page: everything goes through the JSON API under /api/.
// Query parameters run it without clicks: ?example=N&rows=R&n=K&seed=S&run=complete|sample.
"use strict";

const $ = (id) => document.getElementById(id);
const page = { model: null, upload: null, job: null, abort: null };

function setState(state, text) {
  document.body.dataset.state = state;
  if (text !== undefined) $("summary").textContent = text;
}

async function api(path, options) {
  const r = await fetch(path, options);
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).error || msg; } catch (_) { /* not JSON */ }
    throw new Error(msg);
  }
  return r;
}

// ---- drawing: the same grid as `igpt complete` and `igpt sample` write ----

function scaleFor(side) { return Math.min(16, Math.max(1, Math.floor(128 / side))); }

// The colour of pixel i of a tile, or the checkerboard that marks a pixel not known yet.
function pixel(tokens, i, side) {
  if (tokens !== null && i < tokens.length && tokens[i] !== undefined) {
    return page.model.palette[tokens[i]];
  }
  const x = i % side, y = Math.floor(i / side);
  return ((x >> 1) + (y >> 1)) % 2 === 0 ? [96, 96, 110] : [128, 128, 140];
}

// Draws tiles (arrays of tokens, possibly partial) `cols` per row, as grid::save_grid does.
function drawGrid(canvas, tiles, cols) {
  const side = page.model.side, scale = scaleFor(side), pad = 2, tw = side * scale;
  const rows = Math.ceil(tiles.length / cols);
  cols = Math.min(cols, tiles.length);
  const w = cols * (tw + pad) + pad, h = rows * (tw + pad) + pad;
  canvas.width = w;
  canvas.height = h;
  // Shown up to twice its size, crisp (image-rendering: pixelated).
  canvas.style.width = "100%";
  canvas.style.maxWidth = 2 * w + "px";
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  img.data.fill(255);
  tiles.forEach((tokens, t) => {
    const x0 = pad + (t % cols) * (tw + pad), y0 = pad + Math.floor(t / cols) * (tw + pad);
    for (let i = 0; i < side * side; i++) {
      const c = pixel(tokens, i, side);
      const px = (i % side) * scale, py = Math.floor(i / side) * scale;
      for (let dy = 0; dy < scale; dy++) {
        for (let dx = 0; dx < scale; dx++) {
          const at = ((y0 + py + dy) * w + x0 + px + dx) * 4;
          img.data[at] = c[0]; img.data[at + 1] = c[1]; img.data[at + 2] = c[2];
        }
      }
    }
  });
  ctx.putImageData(img, 0, 0);
}

function drawPreview(tokens) {
  const side = page.model.side, canvas = $("preview");
  canvas.width = side;
  canvas.height = side;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(side, side);
  for (let i = 0; i < side * side; i++) {
    const c = page.model.palette[tokens[i]];
    img.data.set([c[0], c[1], c[2], 255], i * 4);
  }
  ctx.putImageData(img, 0, 0);
}

// The grid of the running or finished job: for a completion the original, the kept part and
// the completions; for samples the samples.
function redraw() {
  const job = page.job;
  if (!job) return;
  const keep = job.rowsKept * page.model.side;
  let tiles, cols;
  if (job.mode === "complete") {
    tiles = [job.original, job.original.slice(0, keep), ...job.images];
    cols = job.n + 2;
  } else {
    tiles = job.images;
    cols = Math.ceil(Math.sqrt(job.n));
  }
  drawGrid($("grid"), tiles, cols);
}

// ---- the image ----

async function useImage(blob, caption) {
  setState("encoding", "Reading the image…");
  const enc = await (await api("/api/encode", { method: "POST", body: blob })).json();
  page.upload = { blob, tokens: enc.tokens };
  drawPreview(enc.tokens);
  $("seen").hidden = false;
  $("seen-caption").textContent =
    `${caption}: ${enc.width}x${enc.height}, as the model sees it: ` +
    `${enc.side}x${enc.side} in ${page.model.colours} colours`;
  $("complete").disabled = false;
  $("likelihood").textContent = "likelihood: computing…";
  if (!page.abort) setState("ready", "Ready: Complete keeps the top rows and writes the rest.");
  api("/api/score", { method: "POST", body: blob })
    .then((r) => r.json())
    .then((s) => {
      $("likelihood").textContent =
        `likelihood: ${s.bits_per_token.toFixed(3)} bits per pixel token ` +
        `(${s.nats_per_token.toFixed(4)} nats)`;
    })
    .catch((e) => { $("likelihood").textContent = "likelihood: " + e.message; });
}

async function takeExample(index) {
  const r = await api("/api/examples/" + index);
  await useImage(await r.blob(), "Fashion-MNIST #" + index);
}

// ---- generation, streamed as server-sent events over a POST ----

function settings() {
  const q = new URLSearchParams({
    n: $("n").value,
    temperature: $("temperature").value,
    top_k: $("top-k").value,
    seed: $("seed").value,
  });
  return q;
}

async function run(mode) {
  if (mode === "complete" && !page.upload) {
    setState("error", "Pick an image first.");
    return;
  }
  if (page.abort) page.abort.abort();
  const q = settings();
  const n = Number($("n").value);
  let body = null;
  if (mode === "complete") {
    q.set("rows", $("rows").value);
    body = page.upload.blob;
  }
  const job = {
    mode, n, rowsKept: mode === "complete" ? Number($("rows").value) : 0,
    original: mode === "complete" ? page.upload.tokens : null,
    images: Array.from({ length: n }, () => []), rowsDone: 0, finished: false,
  };
  page.job = job;
  document.body.dataset.rowsSeen = 0;
  $("download").hidden = true;
  const abort = new AbortController();
  page.abort = abort;
  $("stop").disabled = false;
  setState("running", "Waiting for the model…");
  redraw();
  try {
    const r = await api(`/api/${mode}?${q}`, { method: "POST", body, signal: abort.signal });
    await readEvents(r.body, onEvent);
    if (!job.finished) throw new Error("the server closed the stream before the images");
  } catch (e) {
    // A run replaced by a newer one says nothing: the page is the newer run's.
    if (page.abort !== abort) return;
    if (e.name === "AbortError") setState("stopped", "Stopped.");
    else setState("error", "Error: " + e.message);
  } finally {
    if (page.abort === abort) {
      page.abort = null;
      $("stop").disabled = true;
    }
  }
}

function onEvent(name, data) {
  const job = page.job, side = page.model.side;
  if (name === "start") {
    data.kept && job.images.forEach((img) => img.push(...data.kept));
    setState("running", `Generating ${job.n} image(s) (sharing a batch of ` +
      `${data.round_images} with ${data.round_requests - 1} other request(s))…`);
  } else if (name === "row") {
    data.tokens.forEach((row, i) => { job.images[i].splice(data.row * side, side, ...row); });
    job.rowsDone = data.row + 1;
    document.body.dataset.rowsSeen = Number(document.body.dataset.rowsSeen) + 1;
    setState("running", `Row ${data.row + 1} of ${side}…`);
    redraw();
  } else if (name === "done") {
    job.finished = true;
    job.images = data.tokens;
    redraw();
    const link = $("download");
    link.href = $("grid").toDataURL("image/png");
    link.hidden = false;
    setState("done", `Done: ${job.n} image(s), ${side} rows, in ${data.seconds.toFixed(2)} s ` +
      `(${Math.round(data.tokens_per_second)} tokens/s).`);
  } else if (name === "error") {
    throw new Error(data.error);
  }
}

// Calls onEvent(name, data) for each event of a text/event-stream body.
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

// ---- wiring ----

async function start() {
  page.model = await (await api("/api/model")).json();
  const m = page.model;
  $("model").textContent = `${m.name}: ${m.layers} layers, d=${m.width}, ${m.side}x${m.side}, ` +
    `${m.colours} colours, ${m.device} ${m.precision}, batches of ${m.batch}`;
  $("rows").max = m.side - 1;
  $("rows").value = Math.floor(m.side / 2);
  $("n").max = m.limits.max_images;
  $("n").value = Math.min(4, m.limits.max_images);
  const ex = await (await api("/api/examples")).json();
  $("example").max = ex.count - 1;
  setState("idle");

  const show = () => { $("rows-out").textContent = $("rows").value; };
  $("rows").addEventListener("input", show);
  show();
  const guard = (f) => (...a) => f(...a).catch((e) => setState("error", "Error: " + e.message));
  $("file").addEventListener("change", guard(async () => {
    const f = $("file").files[0];
    if (f) await useImage(f, f.name);
  }));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", guard(async (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const f = e.dataTransfer.files[0];
    if (f) await useImage(f, f.name);
  }));
  $("take").addEventListener("click", guard(() => takeExample($("example").value)));
  $("random").addEventListener("click", guard(() => {
    $("example").value = Math.floor(Math.random() * ex.count);
    return takeExample($("example").value);
  }));
  $("complete").addEventListener("click", () => run("complete"));
  $("sample").addEventListener("click", () => run("sample"));
  $("stop").addEventListener("click", () => page.abort && page.abort.abort());

  // Settings and an action from the address, for links and headless checks.
  const q = new URLSearchParams(location.search);
  for (const [key, id] of [["rows", "rows"], ["n", "n"], ["seed", "seed"],
    ["temperature", "temperature"], ["top_k", "top-k"], ["example", "example"]]) {
    if (q.has(key)) $(id).value = q.get(key);
  }
  show();
  if (q.has("example")) await takeExample($("example").value);
  if (q.get("run") === "complete" || q.get("run") === "sample") await run(q.get("run"));
}

start().catch((e) => setState("error", "Error: " + e.message));
