// The clinicians' page: sign in with a key, pick a model, set "what if" values on controls built
// from the model's causal graph, upload a scan, follow the job, compare slices. Only the public
// API; every image is rendered by the service.
import { Api, ApiError } from "./api.js";
import { bounds, descendants, formatValue, levels, niceStep, unitText } from "./graph.js";

const KEY = "cdae-med.api-key";
const PLANES = ["axial", "coronal", "sagittal"];
const VOLUMES = ["input", "counterfactual", "difference"];
const POLL_MS = 750;

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
};

const state = {
  api: null,
  models: [],
  limits: null,
  model: null,
  poll: null,
  following: null,
  result: null, // {job, info}
  urls: new Map(), // img -> object URL
  tokens: new Map(), // img -> request counter, so a slow old slice never replaces a newer one
};

function showError(id, err) {
  const p = $(id);
  if (!err) {
    p.hidden = true;
    p.textContent = "";
    return;
  }
  p.textContent = err instanceof Error ? err.message : String(err);
  p.hidden = false;
}

// -- sign in / out ------------------------------------------------------------------------------
async function signIn(key) {
  const api = new Api(key);
  const [models, limits] = await Promise.all([api.models(), api.limits()]);
  state.api = api;
  state.models = models;
  state.limits = limits;
  sessionStorage.setItem(KEY, key);
  $("#signin").hidden = true;
  $("#app").hidden = false;
  $("#who").hidden = false;
  $("#who-text").textContent = `signed in (key ${key.slice(0, 9)}…)`;
  renderModels();
  refreshJobs();
}

function signOut() {
  sessionStorage.removeItem(KEY);
  stopPolling();
  for (const url of state.urls.values()) URL.revokeObjectURL(url);
  state.urls.clear();
  Object.assign(state, { api: null, models: [], result: null, model: null });
  $("#app").hidden = true;
  $("#who").hidden = true;
  $("#result").hidden = true;
  $("#signin").hidden = false;
  $("#key").value = "";
  $("#key").focus();
}

$("#signin-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  showError("#signin-error", null);
  const key = $("#key").value.trim();
  const button = $("#signin-btn");
  button.disabled = true;
  try {
    await signIn(key);
  } catch (err) {
    showError("#signin-error", err);
  } finally {
    button.disabled = false;
  }
});
$("#signout").addEventListener("click", signOut);

// -- the model and its variables ----------------------------------------------------------------
function isScanModel(m) {
  return m.image && m.image.preprocessing !== null && m.image.preprocessing !== undefined;
}

function renderModels() {
  const select = $("#model");
  select.replaceChildren();
  const usable = state.models.filter(isScanModel);
  for (const m of usable) {
    select.append(el("option", { value: `${m.name}:v${m.version}`,
      text: `${m.name}:v${m.version} (${m.variant}, ${m.image.spatial_dims === 2 ? "2D" : "3D"}, ${m.dataset})` }));
  }
  const others = state.models.length - usable.length;
  $("#model-note").textContent = usable.length === 0
    ? "No scan model is registered on this service: train one on a cohort (cdae-med train --dataset brain)."
    : others > 0 ? `${others} model(s) trained on non-scan images are not listed.` : "";
  $("#submit").disabled = usable.length === 0;
  selectModel(usable[0] || null);
}

$("#model").addEventListener("change", () => {
  selectModel(state.models.find((m) => `${m.name}:v${m.version}` === $("#model").value) || null);
});

function selectModel(model) {
  state.model = model;
  const list = $("#var-list");
  list.replaceChildren();
  if (!model) return;
  for (const v of model.variables) list.append(variableRow(v));
  markRoles();
}

function variableRow(v) {
  const row = el("div", { class: "var", id: `var-${v.name}`, "data-name": v.name });
  const tick = el("input", { type: "checkbox", class: "do", id: `do-${v.name}`,
    "aria-label": `set ${v.name}`, onchange: markRoles });
  row.append(el("label", { for: `do-${v.name}`, class: "name" }, tick, ` ${v.name}`,
    v.binary ? null : el("span", { class: "unit", text: v.unit ? ` (${v.unit})` : "" })));
  const touched = () => { if (!tick.checked) { tick.checked = true; markRoles(); } };
  if (v.binary) {
    const [off, on] = levels(v);
    const sw = el("input", { type: "checkbox", class: "value", role: "switch", id: `value-${v.name}`,
      "aria-label": `${v.name}: ${off} / ${on}` });
    sw.addEventListener("change", touched);
    row.append(el("label", { class: "switch" }, el("span", { text: off }), sw, el("span", { text: on })),
      el("span"));
  } else {
    const [lo, hi] = bounds(v);
    const step = lo !== null && hi !== null ? niceStep(lo, hi) : "any";
    const mid = lo !== null && hi !== null ? Math.round((lo + hi) / 2 / step) * step : lo ?? hi ?? 0;
    // any value may be typed (the slider moves in round steps); the service checks the range
    const number = el("input", { type: "number", class: "value", id: `value-${v.name}`, step: "any",
      min: lo ?? undefined, max: hi ?? undefined, value: String(mid), "aria-label": `${v.name} value` });
    if (lo !== null && hi !== null) {
      const slider = el("input", { type: "range", min: lo, max: hi, step, value: String(mid),
        "aria-label": `${v.name} slider`, id: `slider-${v.name}` });
      slider.addEventListener("input", () => { number.value = slider.value; touched(); });
      number.addEventListener("input", () => { if (number.value !== "") slider.value = number.value; touched(); });
      row.append(slider, number);
    } else {
      number.addEventListener("input", touched);
      row.append(el("span", { class: "hint", text: "no declared range" }), number);
    }
  }
  row.append(el("span", { class: "role", text: "" }));
  return row;
}

function chosen() {
  return [...document.querySelectorAll("#var-list .do:checked")].map((t) => t.closest(".var").dataset.name);
}

function markRoles() {
  if (!state.model) return;
  const set = chosen();
  const changed = descendants(state.model.variables, set);
  for (const row of document.querySelectorAll("#var-list .var")) {
    const name = row.dataset.name;
    const role = $(".role", row);
    row.classList.toggle("intervened", set.includes(name));
    row.classList.toggle("descendant", !set.includes(name) && changed.has(name));
    role.textContent = set.includes(name) ? "set (intervention)"
      : changed.has(name) ? `changes: descendant of ${[...changed.get(name)].join(", ")}` : "";
  }
}

function interventions() {
  const out = {};
  for (const name of chosen()) {
    const v = state.model.variables.find((x) => x.name === name);
    const input = $(`#value-${CSS.escape(name)}`);
    if (v.binary) {
      out[name] = input.checked ? 1 : 0;
      continue;
    }
    const value = Number(input.value);
    if (input.value.trim() === "" || !Number.isFinite(value)) {
      throw new Error(`${name}: give a number`);
    }
    out[name] = value;
  }
  return out;
}

// -- upload and submit --------------------------------------------------------------------------
function mb(bytes) {
  return `${(bytes / (1024 * 1024)).toLocaleString("en-GB", { maximumFractionDigits: 1 })} MB`;
}

$("#scan").addEventListener("change", () => {
  const file = $("#scan").files[0];
  showError("#submit-error", null);
  $("#scan-note").textContent = file ? `${file.name}, ${mb(file.size)}` : "";
  if (file && state.limits && file.size > state.limits.max_upload_bytes) {
    showError("#submit-error", tooLarge(file));
  }
});

function tooLarge(file) {
  return `Too large: ${file.name} is ${mb(file.size)}; this service accepts scans up to ` +
    `${mb(state.limits.max_upload_bytes)}. Nothing was sent.`;
}

$("#job-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  showError("#submit-error", null);
  const file = $("#scan").files[0];
  try {
    if (!state.model) throw new Error("No scan model to use.");
    if (!file) throw new Error("Choose a T1 scan (.nii or .nii.gz) first.");
    if (state.limits && file.size > state.limits.max_upload_bytes) throw new Error(tooLarge(file));
    const what = interventions();
    if (Object.keys(what).length === 0) throw new Error("Set at least one variable (for example age).");
    $("#submit").disabled = true;
    $("#job-status").textContent = "uploading…";
    const accepted = await state.api.submit({ file, interventions: what, model: $("#model").value });
    follow(accepted.id);
    refreshJobs();
  } catch (err) {
    $("#job-status").textContent = "";
    $("#submit").disabled = false;
    showError("#submit-error", err);
  }
});

// -- following a job ----------------------------------------------------------------------------
function stopPolling() {
  if (state.poll) clearTimeout(state.poll);
  state.poll = null;
  state.following = null;
}

function follow(id) {
  stopPolling();
  state.following = id;
  const bar = $("#progress");
  bar.hidden = false;
  bar.value = 0;
  $("#submit").disabled = true;
  const tick = async () => {
    if (state.following !== id) return;
    let job;
    try {
      job = await state.api.job(id);
    } catch (err) {
      showError("#submit-error", err);
      if (err instanceof ApiError && (err.status === 401 || err.status === 404)) {
        finishFollowing();
        return;
      }
      state.poll = setTimeout(tick, POLL_MS * 4);
      return;
    }
    bar.value = job.status === "succeeded" ? 1 : job.progress;
    $("#job-status").textContent = job.status === "running" ? `running ${Math.round(job.progress * 100)}%`
      : job.status === "queued" ? "queued (waiting for a worker)" : job.status;
    if (job.status === "succeeded") {
      finishFollowing();
      refreshJobs();
      showResult(job);
    } else if (job.status === "failed") {
      finishFollowing();
      refreshJobs();
      showError("#submit-error", `The job failed: ${job.error || "no reason recorded"}`);
    } else {
      state.poll = setTimeout(tick, POLL_MS);
    }
  };
  tick();
}

function finishFollowing() {
  stopPolling();
  $("#submit").disabled = false;
  setTimeout(() => { $("#progress").hidden = true; }, 800);
}

// -- the result view ----------------------------------------------------------------------------
function buildViewer(info) {
  const viewer = $("#viewer");
  for (const node of [...viewer.children]) if (!node.classList.contains("head")) node.remove();
  for (const plane of PLANES) {
    const n = info.planes[plane].slices;
    const mid = Math.floor(n / 2);
    const scrub = el("input", { type: "range", min: 0, max: n - 1, step: 1, value: mid, class: "scrubber",
      id: `scrub-${plane}`, "aria-label": `${plane} slice` });
    const out = el("output", { text: `slice ${mid + 1} / ${n}` });
    let timer = null;
    scrub.addEventListener("input", () => {
      out.textContent = `slice ${Number(scrub.value) + 1} / ${n}`;
      clearTimeout(timer); // a fast drag asks only for the slices it rests on
      timer = setTimeout(() => renderPlane(plane), 30);
    });
    viewer.append(el("div", { class: "plane" }, plane, scrub, out));
    for (const volume of VOLUMES) {
      const fig = el("figure", { class: `${volume}${info.volumes.includes(volume) ? "" : " missing"}` });
      if (info.volumes.includes(volume)) {
        fig.append(el("img", { class: "slice", alt: `${volume}, ${plane} slice`, "data-volume": volume,
          "data-plane": plane, width: info.planes[plane].width_px, height: info.planes[plane].height_px }));
      }
      viewer.append(fig);
    }
  }
}

function setupWindowing(info) {
  const [vmin, vmax] = info.intensity_range;
  const span = Math.max(vmax - vmin, info.window, 1e-6);
  const w = $("#window"), l = $("#level"), d = $("#dwindow");
  Object.assign(w, { min: span / 200, max: span * 2, step: span / 400 });
  Object.assign(l, { min: vmin - span / 2, max: vmax + span / 2, step: span / 400 });
  Object.assign(d, { min: info.difference_window / 50, max: info.difference_window * 5,
    step: info.difference_window / 200 });
  const reset = () => {
    w.value = info.window;
    l.value = info.level;
    d.value = info.difference_window;
    showWindowing();
  };
  reset();
  $("#wl-reset").onclick = () => { reset(); renderAll(); };
}

function showWindowing() {
  const fmt = (x) => Number(x).toPrecision(3);
  $("#window-out").textContent = fmt($("#window").value);
  $("#level-out").textContent = fmt($("#level").value);
  $("#dwindow-out").textContent = fmt(Number($("#dwindow").value) / 2);
}

let pending = null;
for (const id of ["#window", "#level", "#dwindow"]) {
  $(id).addEventListener("input", () => {
    showWindowing();
    clearTimeout(pending);
    pending = setTimeout(renderAll, 60);
  });
}

function renderAll() {
  for (const plane of PLANES) renderPlane(plane);
}

function renderPlane(plane) {
  if (!state.result) return;
  const { job } = state.result;
  const index = Number($(`#scrub-${plane}`).value);
  for (const img of document.querySelectorAll(`#viewer img[data-plane="${plane}"]`)) {
    const volume = img.dataset.volume;
    const opts = volume === "difference" ? { window: $("#dwindow").value }
      : { window: $("#window").value, level: $("#level").value };
    loadImage(img, state.api.slicePath(job.id, volume, plane, index, opts));
  }
}

async function loadImage(img, path) {
  const token = (state.tokens.get(img) || 0) + 1;
  state.tokens.set(img, token);
  try {
    const blob = await state.api.blob(path);
    if (state.tokens.get(img) !== token) return;
    const old = state.urls.get(img);
    const url = URL.createObjectURL(blob);
    state.urls.set(img, url);
    img.src = url;
    if (old) URL.revokeObjectURL(old);
    showError("#result-error", null);
  } catch (err) {
    if (state.tokens.get(img) === token) showError("#result-error", err);
  }
}

async function showResult(job) {
  const section = $("#result");
  showError("#result-error", null);
  for (const url of state.urls.values()) URL.revokeObjectURL(url);
  state.urls.clear();
  let info;
  try {
    info = await state.api.sliceInfo(job.id);
  } catch (err) {
    section.hidden = false;
    showError("#result-error", err);
    return;
  }
  state.result = { job, info };
  $("#result-title").textContent = `job ${job.id.slice(0, 8)} · ${job.model || ""} · ` +
    Object.entries(job.params.interventions || {}).map(([k, v]) => `${k} = ${v}`).join(", ");
  buildViewer(info);
  setupWindowing(info);
  section.hidden = false;
  renderAll();
  await renderReport(job);
  renderDownloads(job);
  section.scrollIntoView({ behavior: "smooth", block: "start" });
}

async function renderReport(job) {
  let report = job.result && job.result.report;
  const file = job.files.find((f) => f.name === "report.json");
  if (!report && file) {
    try {
      report = await state.api.json(file.url);
    } catch (err) {
      showError("#result-error", err);
    }
  }
  const body = $("#report tbody");
  body.replaceChildren();
  if (!report) return;
  const model = state.models.find((m) => `${m.name}:v${m.version}` === job.model);
  const vars = new Map((model ? model.variables : []).map((v) => [v.name, v]));
  for (const [name, cf] of Object.entries(report.counterfactual)) {
    const v = vars.get(name) || { name, unit: cf.unit, binary: false };
    const f = report.factual[name] || {};
    const intervened = name in (report.interventions || {});
    const role = cf.role === "descendant" ? "descendant (changed by the graph)" : cf.role;
    const u = unitText(v);
    body.append(el("tr", { class: cf.role, "data-name": name },
      el("td", {}, el("strong", { text: name }), v.binary ? null : el("span", { class: "hint", text: cf.unit ? ` ${cf.unit}` : "" })),
      el("td", { class: "num", text: `${formatValue(v, f.value)}${u}`, title: f.source || "" },
        f.source === "given" ? el("span", { class: "hint", text: " (given)" }) : null),
      el("td", { class: "num", text: intervened ? `${formatValue(v, report.interventions[name])}${u}` : "" }),
      el("td", { class: "num", text: `${formatValue(v, cf.value)}${u}` }),
      el("td", { text: role })));
  }
  $("#report-note").textContent = `Factual values are estimated from the image unless given. ` +
    `${report.settings ? `Model: ${report.settings.model_kind}; ${report.settings.ddim_steps} DDIM steps; ` : ""}` +
    `${report.seconds !== undefined ? `computed in ${report.seconds} s.` : ""}`;
}

function renderDownloads(job) {
  const list = $("#downloads");
  list.replaceChildren();
  for (const { name, url: path } of job.files) { // [{name, url}] as GET /v1/jobs/{id} lists them
    const link = el("a", { href: path, "data-file": name, text: name });
    link.addEventListener("click", async (e) => {
      e.preventDefault(); // the file needs the key header: fetch it, then save the blob
      try {
        const blob = await state.api.blob(link.getAttribute("href"));
        const url = URL.createObjectURL(blob);
        const a = el("a", { href: url, download: name });
        document.body.append(a);
        a.click();
        a.remove();
        setTimeout(() => URL.revokeObjectURL(url), 10_000);
      } catch (err) {
        showError("#result-error", err);
      }
    });
    list.append(el("li", {}, link));
  }
}

// -- the key's own jobs -------------------------------------------------------------------------
async function refreshJobs() {
  if (!state.api) return;
  let jobs;
  try {
    jobs = await state.api.jobs();
    showError("#jobs-error", null);
  } catch (err) {
    showError("#jobs-error", err);
    return;
  }
  const body = $("#jobs-table tbody");
  body.replaceChildren();
  $("#jobs-empty").hidden = jobs.length > 0;
  for (const job of jobs) {
    const when = new Date(job.created_at * 1000).toLocaleString();
    const what = job.kind === "train" ? `training on ${job.params.dataset}`
      : Object.entries(job.params.interventions || {}).map(([k, v]) => `${k} = ${v}`).join(", ");
    let action = null;
    if (job.kind === "counterfactual" && job.status === "succeeded") {
      action = el("button", { type: "button", class: "link", text: "open", onclick: () => showResult(job) });
    } else if (job.kind === "counterfactual" && (job.status === "queued" || job.status === "running")) {
      action = el("button", { type: "button", class: "link", text: "follow", onclick: () => follow(job.id) });
    }
    const status = job.status === "running" ? `running ${Math.round(job.progress * 100)}%` : job.status;
    body.append(el("tr", { "data-id": job.id },
      el("td", { text: when }),
      el("td", { class: `status-${job.status}`, text: status, title: job.error || "" },
        job.error ? el("div", { class: "hint", text: job.error }) : null),
      el("td", { text: job.model || "" }),
      el("td", { text: what }),
      el("td", {}, action)));
  }
}

$("#jobs-refresh").addEventListener("click", refreshJobs);

// -- start --------------------------------------------------------------------------------------
const saved = sessionStorage.getItem(KEY);
if (saved) {
  signIn(saved).catch((err) => {
    sessionStorage.removeItem(KEY);
    $("#signin").hidden = false;
    showError("#signin-error", err);
  });
} else {
  $("#signin").hidden = false;
}
