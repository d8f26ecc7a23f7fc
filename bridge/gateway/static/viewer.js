// The is viewer: plain JavaScript, no build step, nothing fetched but this gateway's API.
// Tiles: at zoom z the frame is a virtual z*S x z*S picture cut in z x z tiles of S px,
// tile (c, r) being the view zoom=z, segcol=c, segrow=r, xsize=S; only the visible
// ones are fetched, so the image stays sharp at every zoom.
"use strict";

const S = 640; // viewport and tile size, CSS pixels
const API = "/api/v1";
const MAX_ZOOM = 64;
const RING_D = [8, 5, 4, 3, 2.5, 2, 1.5]; // Angstrom
const $ = (id) => document.getElementById(id);

const state = {
  fn: "", esaf: 0, frame: 1, last: 1, zoom: 1, panX: 0, panY: 0,
  wval: null, contrast: null, // null: automatic levels
  meta: null, playing: null, generation: 0, wanted: new Set(), cursor: null,
};

function status(text) { $("status").textContent = text || ""; }

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    const error = new Error(`${response.status}: ${detail}`);
    error.status = response.status;
    throw error;
  }
  return response;
}

// -- session ---------------------------------------------------------------------------

async function signIn(pid) {
  await api(`${API}/session`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ pid }),
  });
}

async function showSession() {
  try {
    const who = await (await api(`${API}/session`)).json();
    $("who").textContent = `${who.user} (ESAFs: ${[...new Set([0, ...who.esafs])].join(", ")})`;
    $("signin").hidden = true; $("signout").hidden = false;
    return true;
  } catch (e) {
    $("who").textContent = "not signed in";
    $("signin").hidden = false; $("signout").hidden = true;
    return false;
  }
}

// -- views -----------------------------------------------------------------------------

function viewQuery(extra) {
  const q = new URLSearchParams({ fn: state.fn, frame: String(state.frame), xsize: String(S) });
  if (state.wval !== null) q.set("wval", String(state.wval));
  if (state.contrast !== null) q.set("contrast", String(state.contrast));
  for (const [k, v] of Object.entries(extra || {})) q.set(k, String(v));
  return q;
}

function viewUrl(extra, json) {
  return `${API}/esaf/${state.esaf}/view${json ? ".json" : ""}?${viewQuery(extra)}`;
}

function tileUrl(c, r) {
  const z = state.zoom;
  return viewUrl(z === 1 ? {} : { zoom: z, segcol: c, segrow: r });
}

function clampPan() {
  const span = S * state.zoom - S;
  state.panX = Math.min(Math.max(state.panX, 0), span);
  state.panY = Math.min(Math.max(state.panY, 0), span);
}

function renderTiles() {
  clampPan();
  const z = state.zoom, holder = $("tiles");
  const wanted = new Map(); // url -> [col, row]
  const lastCol = (edge) => Math.min(z - 1, Math.floor((edge + S - 1) / S));
  for (let c = Math.floor(state.panX / S); c <= lastCol(state.panX); c++) {
    for (let r = Math.floor(state.panY / S); r <= lastCol(state.panY); r++) {
      wanted.set(tileUrl(c, r), [c, r]);
    }
  }
  state.wanted = new Set(wanted.keys());
  const slots = new Set([...wanted.values()].map(([c, r]) => `${z}:${c}:${r}`));
  for (const img of [...holder.children]) {
    // Tiles of another frame, contrast or zoom stay (scaled) until their replacement
    // has loaded: no black flash while stepping, zooming or changing contrast.
    const current = wanted.has(img.dataset.url);
    if (!current && img.dataset.zoom === String(z) && !slots.has(img.dataset.slot)) img.remove();
    else place(img);
  }
  const present = new Set([...holder.children].map((img) => img.dataset.url));
  for (const [url, [c, r]] of wanted) {
    if (present.has(url)) continue;
    const img = new Image();
    Object.assign(img.dataset, { url, zoom: String(z), col: String(c), row: String(r),
      frame: String(state.frame), slot: `${z}:${c}:${r}` });
    img.onload = () => {
      img.dataset.loaded = "1";
      for (const old of [...holder.children]) {
        const stale = old.dataset.zoom !== String(state.zoom) || old.dataset.slot === img.dataset.slot;
        if (old !== img && stale && !state.wanted.has(old.dataset.url)) old.remove();
      }
    };
    img.onerror = () => { img.remove(); reportTileError(url); };
    img.src = url;
    place(img);
    holder.appendChild(img);
  }
  $("zoom-num").textContent = String(z);
  $("download").href = viewUrl(z === 1 ? {} : { zoom: z, segcol: state.panX / S, segrow: state.panY / S });
  $("download").download = `${baseName(state.fn)}-${state.frame}.jpg`;
  drawOverlay();
}

// Position (and scale, for a tile of another zoom) one tile in the viewport.
function place(img) {
  const scale = state.zoom / Number(img.dataset.zoom), size = S * scale;
  img.style.width = `${size}px`; img.style.height = `${size}px`;
  img.style.left = `${Number(img.dataset.col) * size - state.panX}px`;
  img.style.top = `${Number(img.dataset.row) * size - state.panY}px`;
}

async function reportTileError(url) {
  try { await api(url); } catch (e) { status(e.message); }
}

function baseName(path) { return path.split("/").pop().replace(/\.[^.]*$/, "") || "view"; }

async function loadFrame() {
  const generation = ++state.generation;
  status("");
  try {
    const view = await (await api(viewUrl({}, true))).json();
    if (generation !== state.generation) return;
    state.meta = view.meta;
    state.last = Math.max(1, Number(view.meta.last_frame) || 1);
    $("frame").max = String(state.last); $("frame-last").textContent = String(state.last);
    setLevels(view.levels);
    renderTiles();
    const stats = await (await api(`${API}/esaf/${state.esaf}/meta?` +
      new URLSearchParams({ fn: state.fn, frame: String(state.frame) }))).json();
    if (generation === state.generation) showPanels(stats);
  } catch (e) {
    if (generation === state.generation) status(e.message);
  }
}

function setLevels(levels) {
  const white = Number(levels.wval_used), black = Number(levels.bval_used);
  const top = Math.max(100, black * 4, Number($("contrast").max) || 0);
  for (const id of ["wval", "contrast"]) $(id).max = String(top);
  $("wval").value = String(white); $("contrast").value = String(black);
  $("wval-num").textContent = state.wval === null ? `auto (${white})` : String(white);
  $("contrast-num").textContent = state.contrast === null ? `auto (${black})` : String(black);
}

function showPanels(meta) {
  const fmt = (v) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(5)) : String(v));
  const fill = (id, pairs) => {
    const dl = $(id); dl.replaceChildren();
    for (const [k, v] of pairs) {
      if (v === undefined || v === null) continue;
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = fmt(v);
      dd.id = `stat-${k.replace(/[^a-z0-9]+/gi, "_")}`;
      dl.append(dt, dd);
    }
  };
  fill("stats", [
    ["spots", meta.spots], ["mean", meta.mean], ["stddev", meta.stddev], ["rms", meta.rms],
    ["min", meta.min], ["max", meta.max], ["n", meta.n],
  ]);
  showRings(Array.isArray(meta.rings) ? meta.rings : [], fmt);
  const g = geometry();
  fill("detector", [
    ["type", meta.description || meta.type], ["wavelength Å", meta.wavelength],
    ["distance mm", g ? g.distance * 1000 : undefined],
    ["beam x, y px", g ? `${fmt(g.bx)}, ${fmt(g.by)}` : undefined],
    ["pixel µm", g ? g.px * 1e6 : undefined], ["size px", g ? `${g.width} × ${g.height}` : undefined],
    ["energy eV", meta.photon_energy],
  ]);
}

// The worker's 16 ring bins (istasks.core.stats.analyse), innermost first: the
// resolution shell each covers (from its radii in detector pixels), its pixels, mean,
// rms and spots. A ring with no pixel in the view is left out.
function showRings(rings, fmt) {
  const body = $("rings-table").tBodies[0];
  body.replaceChildren();
  const g = geometry();
  const shell = (px) => {
    if (!g || px === null || px === undefined) return "–";
    const d = px > 0 ? resolutionAt(g.bx + px, g.by, g) : Infinity;
    return Number.isFinite(d) ? d.toFixed(2) : "∞";
  };
  for (const ring of rings) {
    if (!ring.n) continue;
    const tr = document.createElement("tr");
    tr.dataset.ring = String(ring.ring);
    const cells = [`${shell(ring.inner_px)}–${shell(ring.outer_px)}`, ring.n, ring.mean, ring.rms, ring.spots];
    for (const value of cells) {
      const td = document.createElement("td");
      td.textContent = typeof value === "string" ? value : fmt(value);
      tr.append(td);
    }
    body.append(tr);
  }
}

// -- geometry: resolution at the cursor and rings ---------------------------------------

function geometry() {
  const m = state.meta;
  if (!m) return null;
  const size = Array.isArray(m.data_size) ? m.data_size : [];
  const g = {
    wavelength: Number(m.wavelength), distance: Number(m.detector_distance || m.distance),
    px: Number(m.x_pixel_size), py: Number(m.y_pixel_size || m.x_pixel_size),
    bx: Number(m.beam_center_x), by: Number(m.beam_center_y),
    width: Number(m.x_pixels_in_detector || size[0]), height: Number(m.y_pixels_in_detector || size[1]),
  };
  return Object.values(g).every((v) => Number.isFinite(v) && v > 0) ? g : null;
}

// Tile (c, r) at zoom z is the view zoom=z, segcol=c, segrow=r: its window starts at
// trunc(w * c), trunc(h * r) with w = trunc(width / z), h = trunc(height / z) detector
// pixels, and output pixel i samples i * w / S + origin (istasks.core.reduce). Each tile
// gets its own mapping, so geometry stays exact on zoomed tiles.
function tileFrame(c, r, g) {
  const z = state.zoom;
  const w = z === 1 ? g.width : Math.trunc(g.width / z), h = z === 1 ? g.height : Math.trunc(g.height / z);
  return { left: c * S - state.panX, top: r * S - state.panY, x0: Math.trunc(w * c),
    y0: Math.trunc(h * r), sx: w / S, sy: h / S };
}

// Screen (CSS px in #view) -> detector pixel, through the tile under the point.
function toDetector(x, y, g) {
  const last = state.zoom - 1;
  const c = Math.min(Math.max(Math.floor((x + state.panX) / S), 0), last);
  const r = Math.min(Math.max(Math.floor((y + state.panY) / S), 0), last);
  const t = tileFrame(c, r, g);
  return [t.x0 + (x - t.left) * t.sx, t.y0 + (y - t.top) * t.sy];
}

function resolutionAt(dx, dy, g) {
  const r = Math.hypot((dx - g.bx) * g.px, (dy - g.by) * g.py);
  if (r === 0) return Infinity;
  const theta = Math.atan2(r, g.distance) / 2;
  return g.wavelength / (2 * Math.sin(theta));
}

function drawOverlay() {
  const canvas = $("overlay"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const g = geometry();
  if (!g || !$("rings").checked) return;
  ctx.strokeStyle = "rgba(80, 200, 255, 0.8)"; ctx.fillStyle = "rgba(80, 200, 255, 0.95)";
  ctx.font = "12px system-ui, sans-serif"; ctx.lineWidth = 1;
  const last = state.zoom - 1;
  const first = (pan) => Math.min(Math.floor(pan / S), last);
  for (let c = first(state.panX); c <= Math.min(last, Math.floor((state.panX + S - 1) / S)); c++) {
    for (let r = first(state.panY); r <= Math.min(last, Math.floor((state.panY + S - 1) / S)); r++) {
      const t = tileFrame(c, r, g);
      ctx.save();
      ctx.beginPath(); ctx.rect(t.left, t.top, S, S); ctx.clip();
      const cx = t.left + (g.bx - t.x0) / t.sx, cy = t.top + (g.by - t.y0) / t.sy;
      for (const d of RING_D) {
        const s = g.wavelength / (2 * d);
        if (s >= 1) continue;
        const radius = g.distance * Math.tan(2 * Math.asin(s)); // metres on the detector
        const rx = radius / g.px / t.sx, ry = radius / g.py / t.sy;
        ctx.beginPath(); ctx.ellipse(cx, cy, rx, ry, 0, 0, 2 * Math.PI); ctx.stroke();
        ctx.fillText(`${d} Å`, cx + rx * 0.7071 + 3, cy - ry * 0.7071 - 3);
      }
      ctx.restore();
    }
  }
}

// -- interaction -----------------------------------------------------------------------

function setFrame(frame) {
  const next = Math.min(Math.max(1, frame), state.last);
  if (next === state.frame && state.meta) return;
  state.frame = next;
  $("frame").value = String(next); $("frame-num").textContent = String(next);
  loadFrame();
}

function zoomAt(factor, x, y) {
  const z = Math.min(Math.max(state.zoom * factor, 1), MAX_ZOOM);
  if (z === state.zoom) return;
  const vx = (x + state.panX) / (S * state.zoom), vy = (y + state.panY) / (S * state.zoom);
  state.zoom = z;
  state.panX = vx * S * z - x; state.panY = vy * S * z - y;
  renderTiles();
}

function onPointerMove(event) {
  const rect = $("view").getBoundingClientRect();
  const x = event.clientX - rect.left, y = event.clientY - rect.top;
  state.cursor = [x, y];
  const g = geometry();
  if (!g) { $("res").textContent = "–"; return; }
  const [dx, dy] = toDetector(x, y, g);
  $("pos").textContent = `${dx.toFixed(1)}, ${dy.toFixed(1)} px`;
  const d = resolutionAt(dx, dy, g);
  $("res").textContent = Number.isFinite(d) ? `${d.toFixed(3)} Å` : "∞";
  showValueSoon(Math.max(0, Math.floor(dx + 0.5)), Math.max(0, Math.floor(dy + 0.5)));
}

// The full-depth value of the detector pixel under the cursor, asked of the worker
// (from its frame LRU) once the pointer rests a moment; only the latest answer shows.
const value = { timer: 0, asked: 0 };
function showValueSoon(px, py) {
  clearTimeout(value.timer);
  value.timer = setTimeout(async () => {
    const asked = ++value.asked;
    const q = new URLSearchParams({ fn: state.fn, frame: String(state.frame), x: String(px), y: String(py) });
    try {
      const pixel = await (await api(`${API}/esaf/${state.esaf}/pixel?${q}`)).json();
      if (asked !== value.asked) return;
      $("value").textContent = pixel.value === null ? "outside" : `${pixel.value}${pixel.saturated ? " (saturated)" : ""}`;
      $("value").dataset.at = `${pixel.x},${pixel.y}`;
    } catch (e) {
      if (asked === value.asked) $("value").textContent = "–";
    }
  }, 120);
}

function levelsChanged() {
  state.wval = Number($("wval").value); state.contrast = Number($("contrast").value);
  if (state.contrast <= state.wval) { state.contrast = state.wval + 1; $("contrast").value = String(state.contrast); }
  $("wval-num").textContent = String(state.wval); $("contrast-num").textContent = String(state.contrast);
  renderTiles();
}

function wire() {
  const view = $("view");
  view.addEventListener("wheel", (e) => {
    e.preventDefault();
    const rect = view.getBoundingClientRect();
    zoomAt(e.deltaY < 0 ? 2 : 0.5, e.clientX - rect.left, e.clientY - rect.top);
  }, { passive: false });
  let drag = null;
  view.addEventListener("pointerdown", (e) => {
    drag = { x: e.clientX, y: e.clientY, panX: state.panX, panY: state.panY };
    view.setPointerCapture(e.pointerId); view.classList.add("dragging");
  });
  view.addEventListener("pointermove", (e) => {
    onPointerMove(e);
    if (!drag) return;
    state.panX = drag.panX - (e.clientX - drag.x); state.panY = drag.panY - (e.clientY - drag.y);
    renderTiles();
  });
  view.addEventListener("pointerup", () => { drag = null; view.classList.remove("dragging"); });
  $("frame").addEventListener("input", () => setFrame(Number($("frame").value)));
  $("prev").addEventListener("click", () => setFrame(state.frame - 1));
  $("next").addEventListener("click", () => setFrame(state.frame + 1));
  $("play").addEventListener("click", () => {
    if (state.playing) { clearInterval(state.playing); state.playing = null; $("play").textContent = "▶ play"; return; }
    $("play").textContent = "■ stop";
    state.playing = setInterval(() => setFrame(state.frame >= state.last ? 1 : state.frame + 1), 600);
  });
  document.addEventListener("keydown", (e) => {
    if (e.target instanceof HTMLInputElement && e.target.type !== "range") return;
    if (e.key === "ArrowRight") { e.preventDefault(); setFrame(state.frame + 1); }
    if (e.key === "ArrowLeft") { e.preventDefault(); setFrame(state.frame - 1); }
  });
  $("wval").addEventListener("change", levelsChanged);
  $("contrast").addEventListener("change", levelsChanged);
  $("auto").addEventListener("click", () => { state.wval = null; state.contrast = null; loadFrame(); });
  $("rings").addEventListener("change", drawOverlay);
  $("load").addEventListener("click", openFile);
  $("fn").addEventListener("keydown", (e) => { if (e.key === "Enter") openFile(); });
  $("signin").addEventListener("submit", async (e) => {
    e.preventDefault();
    try { await signIn($("pid").value); $("pid").value = ""; await showSession(); } catch (err) { status(err.message); }
  });
  $("signout").addEventListener("click", async () => { await api(`${API}/session`, { method: "DELETE" }); showSession(); });
}

function openFile() {
  state.fn = $("fn").value.trim(); state.esaf = Number($("esaf").value) || 0;
  state.frame = 1; state.zoom = 1; state.panX = 0; state.panY = 0;
  state.wval = null; state.contrast = null; state.meta = null;
  $("tiles").replaceChildren();
  $("frame").value = "1"; $("frame-num").textContent = "1";
  if (state.fn) loadFrame();
}

async function start() {
  wire();
  // A dev link carries the session in the fragment (never sent to a server): trade it
  // for the HttpOnly cookie at once and drop it from the address bar and history.
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("fn")) $("fn").value = hash.get("fn");
  if (hash.get("esaf")) $("esaf").value = hash.get("esaf");
  if (hash.get("pid")) {
    try { await signIn(hash.get("pid")); } catch (e) { status(e.message); }
    hash.delete("pid");
    history.replaceState(null, "", location.pathname + (hash.toString() ? `#${hash}` : ""));
  }
  if (await showSession() && $("fn").value) openFile();
}

document.addEventListener("DOMContentLoaded", start);
