// The Generate view: text to image, image to image and inpaint (a mask painted on a canvas).

import { api } from "./api.js";
import { track } from "./queue.js";
import { $, el, guard, clearError, shortId } from "./ui.js";

const value = (id) => $(id).value.trim();
const number = (id) => Number($(id).value);
const mode = () => $("#gen-form").elements.mode.value;

// LoRAs ---------------------------------------------------------------------------------------

function addLora(name = "", weight = 1) {
  const row = el(
    "div",
    { className: "lora-row" },
    el("input", {
      className: "lora-name",
      type: "text",
      value: name,
      placeholder: "LoRA name",
      "aria-label": "LoRA name",
    }),
    el("input", {
      className: "lora-weight",
      type: "number",
      min: 0,
      max: 2,
      step: 0.05,
      value: weight,
      "aria-label": "LoRA weight",
    }),
    el("button", {
      type: "button",
      className: "secondary",
      textContent: "Remove",
      onclick: () => row.remove(),
    }),
  );
  row.querySelector(".lora-name").setAttribute("list", "lora-names");
  $("#g-loras").append(row);
}

function loras() {
  return [...document.querySelectorAll("#g-loras .lora-row")]
    .map((row) => ({
      name: row.querySelector(".lora-name").value.trim(),
      weight: Number(row.querySelector(".lora-weight").value),
    }))
    .filter((lora) => lora.name);
}

// The source image and the mask ---------------------------------------------------------------

let sourceFile = null;

function showMode() {
  const m = mode();
  $("#g-source").hidden = m === "text2img";
  $("#g-mask-tools").hidden = m !== "inpaint";
  $("#g-mask").hidden = m !== "inpaint";
  $("#g-count").closest("label").hidden = m !== "text2img"; // batches are text to image only
  $("#g-strength").value = m === "inpaint" ? "1" : "0.75";
}

async function loadSource() {
  sourceFile = $("#g-image").files[0] || null;
  if (!sourceFile) return;
  const bitmap = await createImageBitmap(sourceFile);
  for (const canvas of [$("#g-photo"), $("#g-mask")]) {
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
  }
  $("#g-photo").getContext("2d").drawImage(bitmap, 0, 0);
  $("#g-canvas-box").hidden = false;
  // The result has the input's size, rounded to the multiple of 8 the models need.
  $("#g-width").value = Math.max(8, Math.round(bitmap.width / 8) * 8);
  $("#g-height").value = Math.max(8, Math.round(bitmap.height / 8) * 8);
  $("#g-size").value = "";
}

function paintMask() {
  const canvas = $("#g-mask");
  const ctx = canvas.getContext("2d");
  let last = null;
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return [
      ((event.clientX - box.left) * canvas.width) / box.width,
      ((event.clientY - box.top) * canvas.height) / box.height,
    ];
  };
  const stroke = (event) => {
    const [x, y] = point(event);
    const scale = canvas.width / canvas.getBoundingClientRect().width;
    ctx.strokeStyle = "rgba(255, 40, 90, 0.5)"; // shown over the photo; any paint counts as mask
    ctx.lineCap = "round";
    ctx.lineWidth = number("#g-brush") * scale;
    ctx.beginPath();
    ctx.moveTo(...(last || [x, y]));
    ctx.lineTo(x, y);
    ctx.stroke();
    last = [x, y];
  };
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    last = null;
    stroke(event);
  });
  canvas.addEventListener("pointermove", (event) => event.buttons && stroke(event));
  canvas.addEventListener("pointerup", () => (last = null));
  $("#g-mask-clear").addEventListener("click", () => ctx.clearRect(0, 0, canvas.width, canvas.height));
}

/** The mask as the API wants it: white where anything was painted (repaint), black elsewhere. */
function maskBlob() {
  const { width, height } = $("#g-mask");
  const painted = $("#g-mask").getContext("2d").getImageData(0, 0, width, height);
  const px = painted.data;
  for (let i = 0; i < px.length; i += 4) {
    const v = px[i + 3] ? 255 : 0;
    px[i] = px[i + 1] = px[i + 2] = v;
    px[i + 3] = 255;
  }
  const out = el("canvas", { width, height });
  out.getContext("2d").putImageData(painted, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

function maskIsEmpty() {
  const { width, height } = $("#g-mask");
  const alpha = $("#g-mask").getContext("2d").getImageData(0, 0, width, height).data;
  for (let i = 3; i < alpha.length; i += 4) if (alpha[i]) return false;
  return true;
}

// Submitting ----------------------------------------------------------------------------------

function params() {
  const seed = value("#g-seed");
  const post = { upscale: number("#g-upscale"), face_fix: $("#g-facefix").checked, qc: $("#g-qc").checked };
  if (value("#g-watermark")) post.watermark_text = value("#g-watermark");
  const body = {
    text: value("#g-prompt"),
    negative_prompt: value("#g-negative") || null,
    style: value("#g-style") || null,
    model: value("#g-model") || null,
    width: number("#g-width"),
    height: number("#g-height"),
    steps: number("#g-steps"),
    cfg_scale: number("#g-cfg"),
    sampler: value("#g-sampler") || null,
    seed: seed === "" ? null : Number(seed),
    loras: loras(),
    priority: number("#g-priority"),
    format: value("#g-format"),
    postprocess: post,
  };
  if (mode() !== "text2img") body.strength = number("#g-strength");
  if ($("#g-tiny").checked && !$("#g-tiny").disabled) body.decoder = "tiny";
  return body;
}

async function submit(event) {
  event.preventDefault();
  clearError();
  const body = params();
  if (!body.text) throw new Error("Write a prompt first.");
  let submitted;
  const count = number("#g-count");
  if (mode() === "text2img" && count > 1) {
    // One batch: with a seed, image i gets seed + i.
    submitted = await api("/image/batch-generate", {
      json: { ...body, texts: [body.text], batch_size: count },
    });
  } else if (mode() === "text2img") {
    submitted = await api("/image/generate", { json: body });
  } else {
    if (!sourceFile) throw new Error("Choose an input image first.");
    const form = new FormData();
    form.append("image", sourceFile);
    form.append("params", JSON.stringify(body));
    if (mode() === "inpaint") {
      if (maskIsEmpty()) throw new Error("Paint the area to repaint on the image first.");
      form.append("mask", await maskBlob(), "mask.png");
    }
    submitted = await api(`/image/${mode()}/upload`, { form });
  }
  for (const id of submitted.task_ids) track(id);
  $("#g-status").textContent =
    `Queued task ${submitted.task_ids.map(shortId).join(", ")} — follow it in Queue.`;
}

/** Fill the form from a task's recorded parameters ("use these settings again"). */
export function fillForm(p) {
  const set = (id, v) => ($(id).value = v ?? "");
  // The recorded prompt already holds the style's words, so the style is not applied twice.
  set("#g-prompt", p.prompt);
  set("#g-negative", p.negative_prompt);
  set("#g-style", "");
  set("#g-model", p.model);
  if ($("#g-model").value !== p.model)
    $("#g-model").append(el("option", { value: p.model, textContent: p.model, selected: true }));
  set("#g-size", "");
  set("#g-width", p.width);
  set("#g-height", p.height);
  set("#g-steps", p.steps);
  set("#g-cfg", p.guidance_scale);
  set("#g-sampler", p.scheduler);
  set("#g-seed", p.seed);
  set("#g-priority", p.priority ?? 2);
  set("#g-format", p.format || "webp");
  const post = p.postprocess || {};
  set("#g-upscale", post.upscale || 1);
  $("#g-facefix").checked = Boolean(post.face_fix);
  $("#g-qc").checked = Boolean(post.qc);
  set("#g-watermark", post.watermark_text);
  $("#g-tiny").checked = p.decoder === "tiny";
  offerTiny();
  $("#g-loras").replaceChildren();
  for (const lora of p.loras || []) addLora(lora.name, lora.weight);
  const m = ["img2img", "inpaint"].includes(p.task) ? p.task : "text2img";
  $("#gen-form").elements.mode.value = m;
  showMode();
  if (m !== "text2img") set("#g-strength", p.strength);
  $("#g-status").textContent =
    "Settings loaded" + (m === "text2img" ? "." : " — choose the input image again.");
}

let tinyModels = new Set();

function offerTiny() {
  const model = $("#g-model").value;
  $("#g-tiny").disabled = model !== "" && !tinyModels.has(model);
}

/** Fill the selects the server knows about (styles, models, LoRAs). */
export async function loadOptions() {
  const [styles, models, loraNames] = await Promise.all([api("/styles"), api("/models"), api("/loras")]);
  const fill = (select, items) => {
    select.replaceChildren(
      select.firstElementChild,
      ...items.map(([v, label]) => el("option", { value: v, textContent: label })),
    );
  };
  fill(
    $("#g-style"),
    styles.map((s) => [s.name, s.label]),
  );
  fill(
    $("#h-style"),
    styles.map((s) => [s.name, s.label]),
  );
  fill(
    $("#g-model"),
    models.filter((m) => m.source !== "refused").map((m) => [m.name, `${m.name} (${m.family})`]),
  );
  // "Fast decode" where the server has a tiny decoder: off for a chosen model whose family has none.
  tinyModels = new Set(models.filter((m) => m.tiny_decoder).map((m) => m.name));
  $("#g-tiny-label").hidden = $("#p-tiny-label").hidden = tinyModels.size === 0;
  offerTiny();
  $("#lora-names").replaceChildren(...loraNames.map((n) => el("option", { value: n })));
}

export function initGenerate() {
  $("#gen-form").addEventListener("submit", guard(submit));
  $("#gen-form").addEventListener("change", (event) => event.target.name === "mode" && showMode());
  $("#g-image").addEventListener("change", guard(loadSource));
  $("#g-model").addEventListener("change", offerTiny);
  $("#g-size").addEventListener("change", () => {
    const [w, h] = $("#g-size").value.split("x");
    if (h) [$("#g-width").value, $("#g-height").value] = [w, h];
  });
  for (const id of ["#g-width", "#g-height"])
    $(id).addEventListener("input", () => ($("#g-size").value = ""));
  $("#g-lora-add").addEventListener("click", () => addLora());
  paintMask();
  showMode();
}
