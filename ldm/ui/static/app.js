// The page of `ldm ui`: plain JavaScript, no library and nothing from the network. Long work runs as a job on
// the server; the page polls it for progress and shows its result or its message.
"use strict";
const $ = (id) => document.getElementById(id);
const FIELDS = ["prompt", "negative_prompt", "scheduler", "steps", "guidance_scale", "guidance_rescale", "seed",
                "width", "height", "num_images", "lora", "lora_scale", "model", "prompt_syntax", "long_prompts"];
let inside = null, runTimer = null, playTimer = null;
// The launch's token, from the URL `ldm ui` printed (/?token=...): every API call sends it; the server writes it
// into the image URLs it answers, which an <img> fetches without headers.
const TOKEN = new URLSearchParams(window.location.search).get("token") || "";

async function api(path, options) {
  options = options || {};
  const response = await fetch(path, {...options, headers: {...(options.headers || {}), "X-LDM-Token": TOKEN}});
  const body = await response.json().catch(() => ({error: response.statusText}));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function say(id, text, error) {
  $(id).textContent = text;
  $(id).classList.toggle("error", !!error);
}

function showTab(name) {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.tab === name));
  document.querySelectorAll(".panel").forEach((p) => p.classList.toggle("hidden", p.id !== name));
  if (name === "runs") loadRuns();
}

// Starts a job and polls it until it ends; returns its result, throws its message.
async function runJob(kind, body) {
  const post = {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const {job} = await api(`/api/${kind}`, post);
  const cancel = $(`${kind}-cancel`);
  cancel.disabled = false;
  cancel.onclick = () => api(`/api/jobs/${job}/cancel`, {method: "POST"});
  try {
    for (;;) {
      const state = await api(`/api/jobs/${job}`);
      $(`${kind}-progress`).value = state.progress;
      say(`${kind}-status`, `${state.message} (${state.seconds} s)`);
      if (state.status === "done") return state.result;
      if (state.status !== "running") throw new Error(state.error || state.message);
      await new Promise((r) => setTimeout(r, 250));
    }
  } finally {
    cancel.disabled = true;
  }
}

async function generate() {
  const form = {};
  for (const f of FIELDS) if ($(f).value.trim() !== "") form[f] = $(f).value.trim();
  $("generate-button").disabled = true;
  try {
    const result = await runJob("generate", {...form, ...editForm()});  // editForm: edit.js
    $("gallery").innerHTML = "";
    for (const image of result.images) {
      const figure = document.createElement("figure");
      figure.innerHTML = `<img class="result" src="${image.path}" alt="seed ${image.seed}">
        <figcaption>seed ${image.seed}, ${image.width}x${image.height}
        <a href="${image.path}" download="ldm-${image.seed}.png">download PNG</a></figcaption>`;
      $("gallery").appendChild(figure);
    }
    const p = result.params, how = p.mask ? `inpainting at strength ${p.strength}, ` :
      p.init_image ? `img2img at strength ${p.strength}, ` : "";
    say("generate-status", `${result.images.length} image(s), ${how}${p.scheduler}, ${p.steps} steps`);
    showInside(result.inside);
  } catch (e) {
    say("generate-status", e.message, true);
  } finally {
    $("generate-button").disabled = false;
  }
}

function showInside(report) {
  inside = report;
  $("inside-body").classList.remove("hidden");
  say("inside-status", `seed ${report.seed}: ${report.frames.length} steps`);
  $("inside-filmstrip").src = report.filmstrip;
  $("inside-norms").src = report.norms_plot;
  $("inside-ridge").src = report.histograms_plot;
  $("step-slider").max = report.frames.length - 1;
  $("step-slider").value = 0;
  showStep(0);
}

function showStep(i) {
  const n = inside.norms[i];
  const fmt = (v) => (v === null ? "-" : v.toFixed(3));
  $("inside-frame").src = inside.frames[i];
  $("step-label").textContent = `step ${i} (t=${inside.timesteps[i].toFixed(0)}): RMS cond ${fmt(n.cond)}, ` +
    `uncond ${fmt(n.uncond)}, guided ${fmt(n.guided)}`;
  drawHistogram($("inside-histogram"), inside.histogram_edges, [inside.latent_histograms[i], inside.x0_histograms[i]]);
}

function drawHistogram(canvas, edges, series) {
  const g = canvas.getContext("2d"), w = canvas.width, h = canvas.height - 16;
  const top = Math.max(...series.flat(), 1e-9), lo = edges[0], hi = edges[edges.length - 1];
  const x = (v) => ((v - lo) / (hi - lo)) * w;
  g.clearRect(0, 0, canvas.width, canvas.height);
  ["rgba(51,102,204,0.6)", "rgba(230,126,34,0.6)"].forEach((colour, k) => {
    g.fillStyle = colour;
    series[k].forEach((d, b) => g.fillRect(x(edges[b]), h - (d / top) * h, x(edges[b + 1]) - x(edges[b]), (d / top) * h));
  });
  g.fillStyle = "#333";
  g.fillText(lo.toFixed(1), 0, canvas.height - 2);
  g.fillText(hi.toFixed(1), w - 24, canvas.height - 2);
}

async function fillFromPng(file) {
  try {
    const fields = await api("/api/params", {method: "POST", body: file});
    // a field the PNG does not record takes its default: empty, or a select's first option
    const empty = (f) => ($(f).tagName === "SELECT" ? $(f).options[0].value : "");
    for (const f of FIELDS) $(f).value = fields[f] ?? (f === "prompt" || f === "model" ? $(f).value : empty(f));
    fillEditFields(fields);
    say("generate-status", `form filled from ${file.name}`);
  } catch (e) {
    say("generate-status", e.message, true);
  }
}

async function loadRuns() {
  try {
    const {runs} = await api("/api/runs");
    const chosen = $("run-select").value;
    $("run-select").innerHTML = runs.map((r) => `<option value="${r.path}">${r.name}</option>`).join("");
    if (chosen) $("run-select").value = chosen;
    if (!runs.length) say("run-status", "no training runs in this folder (start ldm ui --runs DIR)");
    else await showRun();
  } catch (e) {
    say("run-status", e.message, true);
  }
}

async function showRun() {
  const path = $("run-select").value;
  if (!path) return;
  try {
    const run = await api(`/api/run?path=${encodeURIComponent(path)}`);
    say("run-status", `${run.losses.count} logged losses` +
      (run.losses.last_step === null ? "" : `, last at step ${run.losses.last_step}: ${run.losses.last.toFixed(4)}`) +
      `; ${run.validation.length} validations; ${run.grids.length} grids`);
    for (const [id, url] of [["run-loss", run.loss_plot], ["run-validation", run.validation_plot]]) {
      $(id).classList.toggle("hidden", !url);
      if (url) $(id).src = url;
    }
    const cols = ["step", "train_loss", "val_train", "val_heldout", "gap", "nearest_ratio_min", "near_copies", "message"];
    const cell = (v) => (v === null || v === undefined ? "" : typeof v === "object" ? JSON.stringify(v) :
      typeof v === "number" ? Number(v.toPrecision(4)) : v);
    $("run-guard").innerHTML = run.guard.length ? `<tr>${cols.map((c) => `<th>${c}</th>`).join("")}</tr>` +
      run.guard.map((r) => `<tr class="${r.warning ? "warning" : ""}">${cols.map((c) => `<td>${cell(r[c])}</td>`).join("")}</tr>`).join("")
      : "<tr><td>no memorisation guard records (ldm finetune writes them at each validation)</td></tr>";
    $("run-grids").innerHTML = run.grids.slice().reverse().map(([step, url]) =>
      `<figure><figcaption>step ${step}</figcaption><img src="${url}" alt="grid at step ${step}"></figure>`).join("");
  } catch (e) {
    say("run-status", e.message, true);
  }
}

async function diagnose() {
  const form = {model: $("diag-model").value, data: $("diag-data").value, num_images: $("diag-num_images").value,
                bins: $("diag-bins").value};
  $("diagnose-button").disabled = true;
  try {
    const result = await runJob("diagnose", form);
    $("diagnose-plots").innerHTML = result.plots.map((url) => `<img src="${url}" alt="diagnostic plot">`).join("");
    say("diagnose-status", `biased bins: ${JSON.stringify(result.biased_bins)}`);
  } catch (e) {
    say("diagnose-status", e.message, true);
  } finally {
    $("diagnose-button").disabled = false;
  }
}

async function init() {
  document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => showTab(t.dataset.tab)));
  $("generate-button").addEventListener("click", generate);
  $("diagnose-button").addEventListener("click", diagnose);
  $("step-slider").addEventListener("input", () => showStep(Number($("step-slider").value)));
  $("step-play").addEventListener("click", () => {
    clearInterval(playTimer);
    let i = 0;
    playTimer = setInterval(() => {
      if (!inside || i >= inside.frames.length) return clearInterval(playTimer);
      $("step-slider").value = i;
      showStep(i++);
    }, 300);
  });
  $("png-input").addEventListener("change", () => $("png-input").files[0] && fillFromPng($("png-input").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) fillFromPng(e.dataTransfer.files[0]);
  });
  $("run-select").addEventListener("change", showRun);
  $("run-refresh").addEventListener("click", loadRuns);
  runTimer = setInterval(() => {
    if ($("run-auto").checked && !$("runs").classList.contains("hidden")) showRun();
  }, 5000);
  const config = await api("/api/config");
  initEdit(config);
  for (const name of config.schedulers) $("scheduler").add(new Option(name, name));
  $("model").value = config.model || "";
  $("diag-model").value = config.model || "";
  const rec = config.recommended_guidance;
  if (rec) {  // empty field = the folder's guidance.json, as `ldm generate` without --guidance-scale
    $("guidance_scale").value = "";
    $("guidance_scale").placeholder = `recommended: ${rec.scale} (${rec.method})`;
  }
}

init().catch((e) => say("generate-status", e.message, true));
