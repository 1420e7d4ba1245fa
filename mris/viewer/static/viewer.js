// MRIS viewer: one radiograph -> /preview and /synthesize -> the ROIs, the maps, the neighbours.
// Plain JavaScript, no dependencies; every request goes to this service (no other host).
"use strict";

const state = {
  config: null,
  token: sessionStorage.getItem("mris-token") || null,
  file: null,
  preview: null,
  image: null,
  answer: null,
  centres: {},       // side -> [x, y] in image pixels (what the page would send as keypoints)
  moved: false,
  dragging: null,
  selected: null,
  sort: {},          // table key -> {key, descending}
};

const $ = (id) => document.getElementById(id);

function show(id, visible) { $(id).hidden = !visible; }

function setStatus(text) { $("status").textContent = text; }

function showProblem(text) {
  $("problem").textContent = text;
  show("problem", Boolean(text));
}

// ---------------------------------------------------------------- requests
function headers() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

class Problem extends Error {
  constructor(status, title, detail) {
    super(`${title}: ${detail}`);
    this.status = status;
  }
}

async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (response.ok) return response;
  let title = response.statusText || `HTTP ${response.status}`;
  let detail = "";
  try {
    const problem = await response.json();
    title = problem.title || title;
    detail = problem.detail || "";
  } catch (error) { /* not problem+json */ }
  if (response.status === 401) askForToken();
  throw new Problem(response.status, title, detail || `HTTP ${response.status}`);
}

function upload(extra = {}) {
  const form = new FormData();
  form.append("file", state.file, state.file.name || "radiograph.dcm");
  for (const [key, value] of Object.entries(extra)) form.append(key, value);
  return form;
}

function askForToken() {
  show("token-panel", true);
  $("token").focus();
}

// ---------------------------------------------------------------- colour maps
function colour(lut, value, max) {
  if (!Number.isFinite(value)) return null;
  const index = Math.max(0, Math.min(255, Math.round((value / max) * 255)));
  return lut[index];
}

function decodeFloat32(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return new Float32Array(bytes.buffer);
}

function paintMap(canvas, values, shape, scale) {
  const [rows, cols] = shape;
  canvas.width = cols;
  canvas.height = rows;
  const context = canvas.getContext("2d");
  const image = context.createImageData(cols, rows);
  for (let i = 0; i < rows * cols; i += 1) {
    const rgb = colour(scale.lut, values[i], scale.max_mm);
    const o = 4 * i;
    if (rgb === null) {  // outside cartilage: light grey
      image.data.set([235, 235, 235, 255], o);
    } else {
      image.data.set([rgb[0], rgb[1], rgb[2], 255], o);
    }
  }
  context.putImageData(image, 0, 0);
}

function colourBar(scale, label) {
  const wrap = document.createElement("div");
  wrap.className = "colorbar";
  const canvas = document.createElement("canvas");
  canvas.width = 1;
  canvas.height = 256;
  const context = canvas.getContext("2d");
  for (let i = 0; i < 256; i += 1) {
    const [r, g, b] = scale.lut[255 - i];
    context.fillStyle = `rgb(${r},${g},${b})`;
    context.fillRect(0, i, 1, 1);
  }
  canvas.setAttribute("aria-label", `${label} colour bar, 0 to ${scale.max_mm} mm`);
  const ticks = document.createElement("div");
  ticks.className = "ticks";
  const step = scale.max_mm > 2 ? 1 : 0.25;
  for (let value = 0; value <= scale.max_mm + 1e-9; value += step) {
    const tick = document.createElement("span");
    tick.className = "tick";
    const top = 100 * (1 - value / scale.max_mm);
    tick.style.top = `${top}%`;
    const atTop = Math.abs(value - scale.max_mm) < 1e-9;
    tick.textContent = `${value.toFixed(step < 1 ? 2 : 0)}${atTop ? "+ mm" : ""}`;
    ticks.appendChild(tick);
  }
  wrap.append(canvas, ticks);
  return wrap;
}

// ---------------------------------------------------------------- the radiograph
function drawRadiograph() {
  const canvas = $("radiograph");
  const { preview, image } = state;
  canvas.width = image.width;
  canvas.height = image.height;
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0);
  for (const knee of state.answer.knees) {
    const side = knee.side;
    const [x, y] = state.centres[side];
    const half = (knee.roi.size_px * preview.scale) / 2;
    const cx = x * preview.scale;
    const cy = y * preview.scale;
    context.strokeStyle = side === "RIGHT" ? "#ff9f1c" : "#2ec4b6";
    context.lineWidth = state.selected === side ? 4 : 2;
    context.strokeRect(cx - half, cy - half, 2 * half, 2 * half);
    context.beginPath();
    context.arc(cx, cy, 6, 0, 2 * Math.PI);
    context.fillStyle = context.strokeStyle;
    context.fill();
    context.font = "bold 16px system-ui, sans-serif";
    context.fillText(`${side}${state.moved ? " (moved)" : ""}`, cx - half + 4, cy - half + 18);
  }
  const list = $("centres");
  list.replaceChildren();
  for (const knee of state.answer.knees) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    const [x, y] = state.centres[knee.side];
    const from = knee.roi.source === "localiser"
      ? `localiser, confidence ${knee.roi.confidence === null ? "n/a" : knee.roi.confidence.toFixed(2)}`
      : "given keypoints";
    button.textContent = `${knee.side} knee: centre (${x.toFixed(0)}, ${y.toFixed(0)}) px, ${from}`;
    button.setAttribute("aria-pressed", String(state.selected === knee.side));
    button.addEventListener("click", () => { state.selected = knee.side; drawRadiograph(); });
    button.addEventListener("keydown", (event) => moveByKey(event, knee.side));
    item.appendChild(button);
    list.appendChild(item);
  }
}

function moveCentre(side, x, y) {
  const { columns, rows } = state.preview;
  state.centres[side] = [Math.max(0, Math.min(columns - 1, x)), Math.max(0, Math.min(rows - 1, y))];
  state.moved = true;
  $("rerun").disabled = false;
  drawRadiograph();
}

function moveByKey(event, side) {
  const step = event.shiftKey ? 20 : 4;
  const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
  if (!(event.key in moves)) return;
  event.preventDefault();
  state.selected = side;
  const [x, y] = state.centres[side];
  const [dx, dy] = moves[event.key];
  moveCentre(side, x + dx / state.preview.scale, y + dy / state.preview.scale);
  const again = [...$("centres").querySelectorAll("button")].find((b) => b.textContent.startsWith(side));
  if (again) again.focus();
}

function canvasPoint(event) {
  const canvas = $("radiograph");
  const box = canvas.getBoundingClientRect();
  const x = ((event.clientX - box.left) / box.width) * canvas.width;
  const y = ((event.clientY - box.top) / box.height) * canvas.height;
  return [x / state.preview.scale, y / state.preview.scale];
}

function nearestCentre(point) {
  let best = null;
  let bestDistance = Infinity;
  for (const knee of state.answer.knees) {
    const [x, y] = state.centres[knee.side];
    const distance = Math.hypot(point[0] - x, point[1] - y);
    if (distance < bestDistance && distance < knee.roi.size_px / 2) {
      best = knee.side;
      bestDistance = distance;
    }
  }
  return best;
}

function wireRadiograph() {
  const canvas = $("radiograph");
  canvas.addEventListener("pointerdown", (event) => {
    if (!state.answer) return;
    const side = nearestCentre(canvasPoint(event));
    if (side) {
      state.dragging = side;
      state.selected = side;
      canvas.setPointerCapture(event.pointerId);
    }
  });
  canvas.addEventListener("pointermove", (event) => {
    if (state.dragging) moveCentre(state.dragging, ...canvasPoint(event));
  });
  canvas.addEventListener("pointerup", () => { state.dragging = null; });
}

// ---------------------------------------------------------------- maps and neighbours
// One cartilage's values at a map point: thickness, SD and, when calibrated, the interval.
function pointText(values, shape, row, col) {
  const i = row * shape[1] + col;
  const where = `${values.label} row ${row}, column ${col}`;
  const value = values.thickness[i];
  if (!Number.isFinite(value)) return `${where}: no cartilage`;
  let text = `${where}: thickness ${value.toFixed(2)} mm, SD ${values.std[i].toFixed(2)} mm`;
  if (values.lower && values.upper) {
    text += `, ${values.interval} [${values.lower[i].toFixed(2)}, ${values.upper[i].toFixed(2)}] mm`;
  }
  return text;
}

// Where the keyboard probe starts: the cartilage cell nearest the map's centre (the centre of
// a map is often outside cartilage), the centre itself when the map has none.
function nearestCartilage(thickness, shape) {
  const [rows, cols] = shape;
  const centre = { row: Math.floor(rows / 2), col: Math.floor(cols / 2) };
  let best = centre;
  let bestDistance = Infinity;
  for (let i = 0; i < rows * cols; i += 1) {
    if (!Number.isFinite(thickness[i])) continue;
    const row = Math.floor(i / cols);
    const col = i % cols;
    const distance = (row - centre.row) ** 2 + (col - centre.col) ** 2;
    if (distance < bestDistance) {
      best = { row, col };
      bestDistance = distance;
    }
  }
  return { ...best };
}

// The value under the pointer, or (keyboard) under a probe moved with the arrow keys.
function hoverMap(canvas, shape, values) {
  const tooltip = $("tooltip");
  const probe = nearestCartilage(values.thickness, shape);
  const showAt = (row, col, x, y) => {
    tooltip.textContent = pointText(values, shape, row, col);
    tooltip.style.left = `${x + 12}px`;
    tooltip.style.top = `${y + 12}px`;
    tooltip.hidden = false;
  };
  const showProbe = () => {
    const box = canvas.getBoundingClientRect();
    const x = box.left + ((probe.col + 0.5) / shape[1]) * box.width;
    const y = box.top + ((probe.row + 0.5) / shape[0]) * box.height;
    showAt(probe.row, probe.col, x, y);
  };
  canvas.addEventListener("mousemove", (event) => {
    const box = canvas.getBoundingClientRect();
    const col = Math.floor(((event.clientX - box.left) / box.width) * shape[1]);
    const row = Math.floor(((event.clientY - box.top) / box.height) * shape[0]);
    if (col < 0 || row < 0 || col >= shape[1] || row >= shape[0]) return;
    showAt(row, col, event.clientX, event.clientY);
  });
  canvas.addEventListener("mouseleave", () => { tooltip.hidden = true; });
  canvas.tabIndex = 0;
  canvas.setAttribute("aria-describedby", "tooltip");
  canvas.addEventListener("focus", showProbe);
  canvas.addEventListener("blur", () => { tooltip.hidden = true; });
  canvas.addEventListener("keydown", (event) => {
    const step = event.shiftKey ? 5 : 1;
    const moves = { ArrowLeft: [0, -step], ArrowRight: [0, step], ArrowUp: [-step, 0], ArrowDown: [step, 0] };
    if (!(event.key in moves)) return;
    event.preventDefault();
    probe.row = Math.max(0, Math.min(shape[0] - 1, probe.row + moves[event.key][0]));
    probe.col = Math.max(0, Math.min(shape[1] - 1, probe.col + moves[event.key][1]));
    showProbe();
  });
}

// "90 % interval" for coverage 0.9 (mris.render.interval_label).
function intervalLabel(coverage) {
  return coverage === null || coverage === undefined
    ? "calibrated interval"
    : `${Number((coverage * 100).toFixed(2))} % interval`;
}

// The knee's uncertainty in words: the calibrated interval's coverage, group and mean width,
// or a notice that the SD is the raw neighbours' spread with no stated coverage.
function uncertaintyLine(uncertainty) {
  if (!uncertainty) return null;
  const line = document.createElement("p");
  line.dataset.kind = uncertainty.kind;
  if (uncertainty.kind === "calibrated-interval") {
    line.className = "uncertainty calibrated";
    const group = uncertainty.group ? `, group ${uncertainty.group}` : "";
    const width = Number.isFinite(uncertainty.reliability_mm)
      ? `mean width ${uncertainty.reliability_mm.toFixed(2)} mm`
      : "no cartilage cell";
    const summary = document.createElement("strong");
    summary.textContent = `${intervalLabel(uncertainty.coverage)} (calibrated on held-out knees${group}): ${width}`;
    const note = document.createElement("span");
    note.className = "note";
    note.textContent = ` \u2014 ${uncertainty.note}.`;
    line.append(summary, note);
  } else {
    line.className = "uncertainty notice";
    line.setAttribute("role", "note");
    const summary = document.createElement("strong");
    summary.textContent = "Uncertainty: the raw neighbours' weighted SD, with no stated coverage.";
    line.append(summary, ` ${uncertainty.note}.`);
  }
  return line;
}

function mapFigure(title, values, shape, scale, kind) {
  const figure = document.createElement("figure");
  figure.className = "map";
  const row = document.createElement("div");
  row.className = "map-row";
  const canvas = document.createElement("canvas");
  canvas.className = "map-canvas";
  canvas.dataset.kind = kind;
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", title);
  paintMap(canvas, values, shape, scale);
  row.append(canvas, colourBar(scale, title));
  const compartments = document.createElement("div");
  compartments.className = "compartments";
  compartments.innerHTML = "<span>medial</span><span>lateral</span>";
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  figure.append(caption, row, compartments);
  return { figure, canvas };
}

const COLUMNS = [
  ["thumb", "map", false],
  ["id", "knee-visit", false],
  ["similarity", "similarity", true],
  ["weight", "weight", true],
  ["visit_month", "visit (month)", true],
  ["klg", "KL grade", true],
];

function neighbourTable(key, neighbours, region, thumbs) {
  const table = document.createElement("table");
  table.className = "neighbours";
  table.dataset.region = region;
  const order = state.sort[key] || { key: "similarity", descending: true };
  const sorted = [...neighbours].sort((a, b) => {
    const x = a[order.key];
    const y = b[order.key];
    const result = x === y ? 0 : (x === null || x === undefined ? 1 : (y === null || y === undefined ? -1 : (x < y ? -1 : 1)));
    return order.descending ? -result : result;
  });
  const head = document.createElement("tr");
  for (const [field, label, sortable] of COLUMNS) {
    const th = document.createElement("th");
    th.scope = "col";
    if (sortable) {
      const button = document.createElement("button");
      button.type = "button";
      const arrow = order.key === field ? (order.descending ? " \u25bc" : " \u25b2") : "";
      button.textContent = label + arrow;
      button.addEventListener("click", () => {
        state.sort[key] = { key: field, descending: order.key === field ? !order.descending : true };
        table.replaceWith(neighbourTable(key, neighbours, region, thumbs));
      });
      th.appendChild(button);
    } else {
      th.textContent = label;
    }
    head.appendChild(th);
  }
  const thead = document.createElement("thead");
  thead.appendChild(head);
  const body = document.createElement("tbody");
  for (const n of sorted) {
    const tr = document.createElement("tr");
    tr.className = "neighbour";
    const thumbCell = document.createElement("td");
    const thumb = document.createElement("canvas");
    thumb.className = "thumb";
    thumb.setAttribute("role", "img");
    thumb.setAttribute("aria-label", `${region.toUpperCase()} map of ${n.id}`);
    const cached = thumbs.get(n.id);
    if (cached && cached.maps[region]) {
      const map = cached.maps[region];
      paintMap(thumb, decodeFloat32(map.data), map.shape, state.config.thickness);
    }
    thumbCell.appendChild(thumb);
    const cells = [
      ["id", n.id],
      ["similarity", n.similarity.toFixed(3)],
      ["weight", n.weight === undefined ? "" : n.weight.toFixed(3)],
      ["visit", n.visit_month === undefined ? "" : String(n.visit_month)],
      ["klg", n.klg === null || n.klg === undefined ? "?" : String(n.klg)],
    ];
    tr.appendChild(thumbCell);
    for (const [cls, text] of cells) {
      const td = document.createElement("td");
      td.className = cls;
      td.textContent = text;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  table.append(thead, body);
  return table;
}

async function neighbourMaps(answer) {
  const ids = new Set();
  for (const knee of answer.knees) {
    for (const list of Object.values(knee.neighbours)) for (const n of list) ids.add(n.id);
  }
  const thumbs = new Map();
  const queue = [...ids];
  async function worker() {
    while (queue.length) {
      const id = queue.shift();
      try {
        const response = await call(`/neighbours/${encodeURIComponent(id)}`);
        thumbs.set(id, await response.json());
      } catch (error) { /* a missing thumbnail is not worth an alert */ }
    }
  }
  await Promise.all([worker(), worker(), worker(), worker()]);
  return thumbs;
}

function renderResults(answer, thumbs) {
  const container = $("knees");
  container.replaceChildren();
  for (const knee of answer.knees) {
    const section = document.createElement("section");
    section.className = "knee";
    section.dataset.side = knee.side;
    const title = document.createElement("h3");
    const mirrored = knee.side === "RIGHT" ? " (shown mirrored, as in atlas space)" : "";
    title.textContent = `${knee.side} knee${mirrored}: k = ${answer.k}, ${answer.variant}, index ${answer.index_version}`;
    section.append(title);
    const line = uncertaintyLine(knee.uncertainty);
    if (line) section.append(line);
    const interval = intervalLabel(knee.uncertainty ? knee.uncertainty.coverage : null);
    let maps = null;
    for (const name of state.config.cartilages) {
      const map = knee.maps[name];
      if (!map) continue;
      const upper = name.toUpperCase();
      const values = {
        label: `${knee.side} ${upper}`,
        thickness: decodeFloat32(map.data),
        std: decodeFloat32(map.std),
        lower: map.lower ? decodeFloat32(map.lower) : null,
        upper: map.upper ? decodeFloat32(map.upper) : null,
        interval,
      };
      const figures = [
        mapFigure(`${upper} synthesized thickness (mm)`, values.thickness, map.shape, state.config.thickness, "thickness"),
        mapFigure(`${upper} uncertainty, weighted SD (mm)`, values.std, map.shape, state.config.uncertainty, "uncertainty"),
      ];
      if (values.lower && values.upper) {  // the interval's bounds: thicknesses, same scale
        figures.push(
          mapFigure(`${upper} ${interval}, lower (mm)`, values.lower, map.shape, state.config.thickness, "lower"),
          mapFigure(`${upper} ${interval}, upper (mm)`, values.upper, map.shape, state.config.thickness, "upper"),
        );
      }
      // With intervals a row per cartilage (its four maps together); else one row for both.
      if (!maps || values.lower) {
        maps = document.createElement("div");
        maps.className = "maps";
        maps.dataset.cartilage = values.lower ? name : "all";
        section.append(maps);
      }
      for (const { figure, canvas } of figures) {
        hoverMap(canvas, map.shape, values);
        maps.append(figure);
      }
    }
    for (const [region, neighbours] of Object.entries(knee.neighbours)) {
      const caption = document.createElement("h3");
      caption.textContent = `${knee.side} ${region.toUpperCase()}: the ${neighbours.length} neighbours the map is made of`;
      section.append(caption, neighbourTable(`${knee.side}-${region}`, neighbours, region, thumbs));
    }
    container.appendChild(section);
  }
}

// ---------------------------------------------------------------- the flow
function requestOptions(withKeypoints) {
  const options = { k: String(Math.max(1, Math.min(100, Number($("k").value) || 20))) };
  if (withKeypoints) {
    const keypoints = {};
    for (const [side, xy] of Object.entries(state.centres)) keypoints[side.toLowerCase()] = xy;
    options.keypoints = JSON.stringify(keypoints);
  }
  return options;
}

async function analyse(withKeypoints) {
  if (!state.file) return;
  document.body.dataset.ready = "busy";
  showProblem("");
  setStatus("Reading the radiograph...");
  $("rerun").disabled = true;
  try {
    if (!state.preview) {
      const response = await call("/preview", { method: "POST", body: upload() });
      state.preview = await response.json();
      state.image = await new Promise((resolve, reject) => {
        const image = new Image();
        image.onload = () => resolve(image);
        image.onerror = () => reject(new Error("the preview image did not load"));
        image.src = `data:image/png;base64,${state.preview.png}`;
      });
    }
    setStatus("Finding the knees and their neighbours...");
    const response = await call("/synthesize?format=json", { method: "POST", body: upload(requestOptions(withKeypoints)) });
    const answer = await response.json();
    state.answer = answer;
    state.moved = false;
    for (const knee of answer.knees) state.centres[knee.side] = [...knee.roi.centre_xy];
    show("radiograph-panel", true);
    drawRadiograph();
    setStatus("Loading the neighbours' maps...");
    const thumbs = await neighbourMaps(answer);
    renderResults(answer, thumbs);
    show("results", true);
    setStatus(`Done: ${answer.knees.length} knee(s), k = ${answer.k}.`);
    document.body.dataset.ready = "true";
  } catch (error) {
    setStatus("");
    showProblem(error instanceof Problem ? error.message : `Something went wrong: ${error.message}`);
    document.body.dataset.ready = "error";
  }
}

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  state.preview = null;
  state.answer = null;
  state.centres = {};
  document.body.dataset.ready = "busy";
  show("radiograph-panel", false);
  show("results", false);
  analyse(false);
}

async function download(format) {
  if (!state.file) return;
  try {
    const response = await call(`/synthesize?format=${format}`, { method: "POST", body: upload(requestOptions(state.moved)) });
    const blob = await response.blob();
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = { npz: "mris-maps.npz", png: "mris-maps.png", dicom: "mris-dicom.zip" }[format];
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  } catch (error) {
    showProblem(error.message);
  }
}

async function start() {
  wireRadiograph();
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    chooseFile(event.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file").click(); }
  });
  $("file").addEventListener("change", (event) => chooseFile(event.target.files[0]));
  $("rerun").addEventListener("click", () => analyse(true));
  for (const button of $("downloads").querySelectorAll("button")) {
    button.addEventListener("click", () => download(button.dataset.format));
  }
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("token").value.trim() || null;
    if (state.token) sessionStorage.setItem("mris-token", state.token);
    show("token-panel", false);
    if (state.file) analyse(state.moved);
  });
  try {
    state.config = await (await call("/viewer/config")).json();
    document.body.dataset.ready = "idle";
  } catch (error) {
    showProblem(`The viewer could not start: ${error.message}`);
  }
}

start();
