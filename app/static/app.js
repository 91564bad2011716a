// STAR web page: submit to POST /generate, follow GET /jobs/{id}/events (Server-Sent Events;
// polling GET /jobs/{id} if the stream fails), show each job's images with their parameters
// (as run: sampling fields left empty get the model's defaults, and sampler "auto" the model's
// sampler head or plain sampling, which the job then reports).
// Plain browser JavaScript, no build step.
"use strict";

const FINAL = ["succeeded", "failed", "canceled", "expired"];
const $ = (selector, root = document) => root.querySelector(selector);

// Server messages quote names in backticks (`seed`): shown as <code>, never as raw backticks.
function show(element, text) {
  renderMessage(element, text);
  element.hidden = !text;
}

function renderMessage(element, text) {
  element.replaceChildren();
  const parts = String(text || "").split("`");
  if (parts.length % 2 === 0) {            // an unpaired backtick: plain text
    element.textContent = String(text);
    return;
  }
  parts.forEach((part, i) => {
    if (!part) return;
    if (i % 2) {
      const code = document.createElement("code");
      code.textContent = part;
      element.append(code);
    } else {
      element.append(part);
    }
  });
}

// API keys: when the server answers 401, ask for a key once, keep it in this browser
// (localStorage) and send it as `Authorization: Bearer ...`. The event stream cannot carry the
// header, so with keys on, jobs are followed by polling.
const KEY_ITEM = "star-api-key";

async function api(path, options = {}) {
  for (let attempt = 0; ; attempt++) {
    const key = localStorage.getItem(KEY_ITEM);
    const headers = { ...(options.headers || {}), ...(key ? { Authorization: `Bearer ${key}` } : {}) };
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401 || attempt > 0) return response;
    const entered = window.prompt("This server needs an API key:");
    if (!entered) return response;
    localStorage.setItem(KEY_ITEM, entered.trim());
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function loadModels() {
  const service = $("#service");
  try {
    const response = await api("/models");
    if (!response.ok) throw new Error(await errorMessage(response));
    const models = await response.json();
    const select = $("#size");
    select.replaceChildren();
    for (const size of models.sizes) {
      const option = new Option(`${size} × ${size}`, String(size));
      option.selected = size === models.default_size;
      select.append(option);
    }
    showExamples(models.models.flatMap((m) => m.example_prompts || []));
    if (!models.sizes.length) {
      select.append(new Option("server default", ""));
      service.textContent = "No worker is running yet: requests will be refused until one starts.";
    } else {
      const names = models.models.map((m) => `${m.name} (${m.size}px, ${m.workers} worker${m.workers === 1 ? "" : "s"}` +
        (m.sampling ? `, guidance ${m.sampling.guidance_scale} by default` : "") +
        (m.sampler_head ? ", sampler head)" : ")"));
      service.textContent = `Serving ${names.join(", ")}`;
      // "head" only where some served model has a sampler head (the server refuses it elsewhere)
      $("#sampler option[value=head]").disabled = !models.models.some((m) => m.sampler_head);
    }
  } catch (error) {
    service.textContent = `Cannot read the served models: ${error.message}`;
  }
}

// The served models' example prompts (their config.json, via GET /models): the placeholder, and
// one button each that puts it in the prompt box.
function showExamples(prompts) {
  const unique = [...new Set(prompts)];
  const box = $("#examples");
  box.querySelectorAll("button").forEach((button) => button.remove());
  for (const text of unique) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "example secondary";
    button.textContent = text;
    button.addEventListener("click", () => {
      $("#prompt").value = text;
      $("#prompt").focus();
    });
    box.append(button);
  }
  if (unique.length) $("#prompt").placeholder = unique[0];
  box.hidden = !unique.length;
}

// Put a request's parameters back into the form (what "Same seed again" submits).
function fillForm(request) {
  const form = $("#generate-form");
  form.prompt.value = request.prompt;
  form.negative_prompt.value = request.negative_prompt || "";
  if ([...form.size.options].some((option) => option.value === String(request.size))) {
    form.size.value = String(request.size);
  }
  form.seed.value = request.seed;
  form.guidance_scale.value = request.guidance_scale == null ? "" : request.guidance_scale;
  form.guidance_stop_scale.value = request.guidance_stop_scale == null ? "" : request.guidance_stop_scale;
  if (request.sampler) form.sampler.value = request.sampler;
  form.n.value = String(request.n);
}

function formRequest() {
  const form = $("#generate-form");
  const body = { prompt: form.prompt.value };
  if (form.negative_prompt.value.trim()) body.negative_prompt = form.negative_prompt.value;
  if (form.size.value) body.size = Number(form.size.value);
  if (form.seed.value !== "") body.seed = Number(form.seed.value);
  if (form.guidance_scale.value !== "") body.guidance_scale = Number(form.guidance_scale.value);
  if (form.guidance_stop_scale.value !== "") body.guidance_stop_scale = Number(form.guidance_stop_scale.value);
  if (form.sampler.value !== "auto") body.sampler = form.sampler.value;   // auto: the server's default
  body.n = Number(form.n.value);
  return body;
}

async function submit(body) {
  const formError = $("#form-error");
  show(formError, "");
  if (!body.prompt || !body.prompt.trim()) {
    show(formError, "Write a prompt first.");
    $("#prompt").focus();
    return;
  }
  const button = $("#generate");
  button.disabled = true;
  try {
    const response = await api("/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!response.ok) {
      show(formError, await errorMessage(response));
      return;
    }
    const accepted = await response.json();
    follow(accepted, addJobCard(body, accepted));
  } catch (error) {
    show(formError, `The server did not answer: ${error.message}`);
  } finally {
    button.disabled = false;
  }
}

function addJobCard(body, accepted) {
  const card = $("#job-template").content.firstElementChild.cloneNode(true);
  card.dataset.jobId = accepted.id;
  $(".job-prompt", card).textContent = body.prompt;
  $(".cancel", card).addEventListener("click", async () => {
    $(".cancel", card).disabled = true;
    await api(`/jobs/${accepted.id}`, { method: "DELETE" });
  });
  $("#empty").hidden = true;
  $("#gallery").prepend(card);
  render(card, { status: "queued", queue_position: accepted.queue_position });
  return card;
}

function render(card, job) {
  const text = $(".status-text", card);
  const bar = $(".bar", card);
  card.dataset.status = job.status;
  if (job.status === "queued") {
    const position = job.queue_position;
    text.textContent = position ? `Queued: ${position} job${position === 1 ? "" : "s"} ahead` : "Queued: next";
    bar.removeAttribute("value");          // indeterminate while waiting
  } else if (job.status === "running") {
    const p = job.progress;
    text.textContent = p ? `Running: scale ${p.scale} of ${p.scales}` : "Running";
    bar.max = p ? p.scales : 1;
    bar.value = p ? p.scale : 0;
    if (job.cancel_requested) text.textContent += " (canceling)";
  } else {
    finish(card, job);
  }
}

function finish(card, job) {
  const text = $(".status-text", card);
  $(".cancel", card).hidden = true;
  $(".bar", card).hidden = true;
  card.dataset.status = job.status;
  if (job.status !== "succeeded") {
    const detail = job.error ? `: ${job.error.message}` : "";
    renderMessage(text, `${job.status[0].toUpperCase()}${job.status.slice(1)}${detail}`);
    card.classList.add("problem");
    return;
  }
  const t = job.timings || {};
  text.textContent = `Done in ${fmt(t.total_s)} s (queue ${fmt(t.queue_wait_s)} s, model ${fmt(t.model_s)} s) on ${job.model}`;
  const images = $(".images", card);
  for (const image of job.images) images.append(resultFigure(job, image));
}

function fmt(seconds) {
  return seconds == null ? "?" : Number(seconds).toFixed(2);
}

function resultFigure(job, image) {
  const figure = $("#image-template").content.firstElementChild.cloneNode(true);
  const request = job.request;
  const img = $("img", figure);
  img.src = image.url;
  img.alt = `${request.prompt} (seed ${image.seed})`;
  img.width = image.width;
  img.height = image.height;
  $("a.open", figure).href = image.url;
  const download = $("a.download", figure);
  download.href = image.url;
  download.download = `star-${image.seed}.png`;
  const params = [
    ["Prompt", request.prompt], ["Negative", request.negative_prompt || "—"],
    ["Seed", image.seed], ["Size", `${image.width} × ${image.height}`],
    ["Guidance", request.guidance_scale], ["Sampler", request.sampler], ["Model", job.model],
  ];
  if (request.guidance_stop_scale != null) params.push(["Unguided from scale", request.guidance_stop_scale]);
  const list = $(".params", figure);
  for (const [name, value] of params) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = String(value);
    dd.className = `param-${name.toLowerCase().replaceAll(" ", "-")}`;
    list.append(dt, dd);
  }
  $(".again", figure).addEventListener("click", () => {
    const again = { ...request, seed: image.seed, n: 1 };   // every parameter as run, this image's seed
    fillForm(again);
    submit(again);
  });
  return figure;
}

function follow(accepted, card) {
  if (!("EventSource" in window) || localStorage.getItem(KEY_ITEM)) return poll(accepted.id, card);
  const source = new EventSource(`/jobs/${accepted.id}/events`);
  let done = false;
  for (const name of ["queued", "running"]) {
    source.addEventListener(name, (event) => render(card, JSON.parse(event.data)));
  }
  for (const name of FINAL) {
    source.addEventListener(name, (event) => {
      done = true;
      source.close();
      finish(card, JSON.parse(event.data));
    });
  }
  source.addEventListener("error", () => {   // the stream failed (or the server has no SSE): poll
    if (done) return;
    source.close();
    poll(accepted.id, card);
  });
}

async function poll(jobId, card) {
  for (;;) {
    let job;
    try {
      const response = await api(`/jobs/${jobId}`);
      if (response.status === 404) {
        finish(card, { status: "failed", error: { message: await errorMessage(response) } });
        return;
      }
      if (response.ok) job = await response.json();
    } catch (_) { /* the server may be restarting: try again */ }
    if (job) {
      render(card, job);
      if (FINAL.includes(job.status)) return;
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  loadModels();
  const form = $("#generate-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit(formRequest());
  });
  $("#prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      submit(formRequest());
    }
  });
});
