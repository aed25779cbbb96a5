// The playground: a form over POST /generate with Accept: text/event-stream (queued, progress, image).
"use strict";
const $ = (id) => document.getElementById(id);
let modelName = null;
let editsByReference = false;

async function loadLimits() {
  const models = await (await fetch("/v1/models")).json();
  modelName = models.models[0];
  $("model-name").textContent = modelName;
  const info = await (await fetch(`/v1/models/${encodeURIComponent(modelName)}/schedulers`)).json();
  for (const name of info.schedulers) {
    const option = new Option(name, name, name === info.default_scheduler, name === info.default_scheduler);
    $("scheduler").add(option);
  }
  $("num_inference_steps").max = info.max_steps;
  $("num_inference_steps").value = info.default_steps;
  $("guidance_scale").value = info.default_guidance_scale;
  $("guidance_scale").closest("label").hidden = info.guidance === "none";  // FLUX.1-schnell, Qwen-Image: no scale
  if (info.default_true_cfg_scale !== undefined) $("true_cfg_scale").value = info.default_true_cfg_scale;
  // The family-only fields the served model takes; the page has inputs for some of them.
  for (const [field, taken] of Object.entries(info.request_fields || {})) {
    const label = $(`${field}-label`);
    if (label) label.hidden = !taken;
  }
  $("api_key-label").hidden = !info.api_key_required;
  $("api_key").value = sessionStorage.getItem("api_key") || "";
  await loadAdapters();
  $("inputs").hidden = !(info.modes || []).some((mode) => mode !== "text");
  // A model that edits by reference images takes several, and no mask or strength.
  editsByReference = (info.modes || []).includes("edit");
  $("input-image").multiple = editsByReference;
  $("mask").closest("label").hidden = editsByReference;
  $("strength").closest("label").hidden = editsByReference;
  if (editsByReference) $("inputs").querySelector("legend").textContent = "Reference images (one or more: the edit's)";
  for (const field of ["width", "height"]) {
    $(field).max = info.max_image_size;
    $(field).step = info.image_size_multiple;
    $(field).placeholder = info.native_size;
  }
}

// With API keys on, the adapter list needs the key too: listed once one is given.
async function loadAdapters() {
  const key = $("api_key").value.trim();
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  const response = await fetch(`/v1/models/${encodeURIComponent(modelName)}/loras`, { headers });
  const adapters = response.ok ? await response.json() : {};
  const usable = (adapters.loras || []).filter((entry) => entry.available).map((entry) => entry.name);
  $("loras-label").hidden = usable.length === 0;
  $("loras-available").textContent = usable.join(", ");
}

function readFile(input, index = 0) {
  const file = input.files && input.files[index];
  if (!file) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result); // a data: URL, which the server accepts as base64
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addInputs(body) {
  if ($("inputs").hidden) return body;
  const files = $("input-image").files || [];
  if (editsByReference) {  // every chosen file is a reference of the edit
    const references = await Promise.all(Array.from(files, (_, index) => readFile($("input-image"), index)));
    if (references.length) body.image = references.length === 1 ? references[0] : references;
    return body;
  }
  const [image, mask] = await Promise.all([readFile($("input-image")), readFile($("mask"))]);
  if (image) body.image = image;
  if (mask) body.mask = mask;
  if (image && $("strength").value !== "") body.strength = parseFloat($("strength").value);
  return body;
}

// "style:0.8, other" -> [{name: "style", scale: 0.8}, {name: "other"}]; the server checks names and scales.
function parseLoras(text) {
  return text.split(",").map((item) => item.trim()).filter(Boolean).map((item) => {
    const [name, scale] = item.split(":");
    return scale === undefined ? { name: name.trim() } : { name: name.trim(), scale: parseFloat(scale) };
  });
}

function requestBody() {
  const body = { prompt: $("prompt").value, output_format: $("output_format").value, scheduler: $("scheduler").value };
  if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
  for (const field of ["prompt_2", "prompt_3"]) {
    if (!$(`${field}-label`).hidden && $(field).value) body[field] = $(field).value;
  }
  // True CFG needs a negative prompt: sent with one, so the scale shown is the scale used.
  if (!$("true_cfg_scale-label").hidden && body.negative_prompt) body.true_cfg_scale = parseFloat($("true_cfg_scale").value);
  for (const field of ["num_inference_steps", "width", "height", "seed"]) {
    if ($(field).value !== "") body[field] = parseInt($(field).value, 10);
  }
  if (!$("guidance_scale").closest("label").hidden) body.guidance_scale = parseFloat($("guidance_scale").value);
  if ($("previews").checked) body.partial_images = 3; // preview events: a cheap look at the latents
  if (!$("loras-label").hidden && $("loras").value.trim()) body.loras = parseLoras($("loras").value);
  return body;
}

function requestHeaders() {
  const headers = { "Content-Type": "application/json", "Accept": "text/event-stream" };
  const key = $("api_key").value.trim();
  if (key) {
    sessionStorage.setItem("api_key", key);
    headers.Authorization = `Bearer ${key}`;
  }
  return headers;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "Failed.";
}

function handleEvent(name, data) {
  if (name === "queued") {
    $("status").textContent = data.position > 0 ? `Queued (${data.position} ahead)` : "Starting...";
  } else if (name === "progress") {
    $("progress").max = data.total;
    $("progress").value = data.step;
    $("status").textContent = `Step ${data.step} of ${data.total}`;
  } else if (name === "preview") {
    $("image").src = `data:image/${data.format};base64,${data.b64}`;
    $("result").hidden = false;
  } else if (name === "image") {
    $("image").src = `data:image/${data.format};base64,${data.b64}`;
    $("result-seed").textContent = data.seed;
    $("result").hidden = false;
    $("status").textContent = data.nsfw ? "Done (flagged by the safety checker)." : "Done.";
  } else if (name === "error") {
    showError(data.error);
  }
}

async function generate(event) {
  event.preventDefault();
  $("error").hidden = true;
  $("generate").disabled = true;
  $("progress").value = 0;
  $("status").textContent = "Sending...";
  try {
    const response = await fetch("/generate", {
      method: "POST",
      headers: requestHeaders(),
      body: JSON.stringify(await addInputs(requestBody())),
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({ error: response.statusText }));
      showError(`${response.status}: ${error.error}`);
      return;
    }
    let finished = false;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const name = /^event: (.*)$/m.exec(block)?.[1];
        const data = /^data: (.*)$/m.exec(block)?.[1];
        if (name && data) {
          handleEvent(name, JSON.parse(data));
          finished = finished || name === "image" || name === "error";
        }
      }
    }
    if (!finished) showError("The connection closed before the image arrived.");
  } catch (error) {
    showError(String(error));
  } finally {
    $("generate").disabled = false;
  }
}

$("form").addEventListener("submit", generate);
$("reuse-seed").addEventListener("click", () => { $("seed").value = $("result-seed").textContent; });
$("api_key").addEventListener("change", () => loadAdapters().catch(() => {}));
loadLimits().catch((error) => showError(`Could not reach the server: ${error}`));
