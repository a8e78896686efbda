// The Portraits view: 1-3 selfies in, the stages as they run, the shortlist with scores and the
// contact sheet out (POST /api/v1/portrait).

import { api, download, followEvents, imageUrl } from "./api.js";
import { $, el, guard, clearError, shortId } from "./ui.js";

// The stages of a portrait task, in order (engine/portrait.py STAGES).
const STAGES = ["selfies", "drafts", "qc", "refine", "fix", "upscale", "write"];
let running = null; // {id, abort}

const asDataUrl = (file) =>
  new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });

function showPreviews() {
  const files = [...$("#p-selfies").files];
  $("#p-previews").replaceChildren(
    ...files.map((file) => el("img", { src: URL.createObjectURL(file), alt: file.name, className: "thumb" })),
  );
}

function showStage(stage, progress, status) {
  $("#p-stages").hidden = $("#p-progress").hidden = false;
  const at = STAGES.indexOf(stage);
  $("#p-stages").replaceChildren(
    ...STAGES.map((name, i) =>
      el("li", {
        textContent: name,
        className: i < at || status === "succeeded" ? "done" : i === at ? "current" : "",
      }),
    ),
  );
  $("#p-progress").value = status === "succeeded" ? 100 : progress;
  $("#p-status").textContent = `${status} ${$("#p-progress").value}%${stage ? " · " + stage : ""}`;
}

function body() {
  const text = (id) => $(id).value.trim() || null;
  const seed = text("#p-seed");
  const out = {
    prompt: $("#p-prompt").value.trim(),
    n: Number($("#p-n").value),
    shortlist: Number($("#p-shortlist").value),
    refine_top: Number($("#p-refine").value),
    upscale: Number($("#p-upscale").value),
    format: $("#p-format").value,
    face_fix: $("#p-facefix").checked,
    seed: seed === null ? null : Number(seed),
  };
  if ($("#p-tiny").checked) out.draft_decoder = "tiny";
  for (const [name, id] of [
    ["model", "#p-model"],
    ["instantid", "#p-instantid"],
    ["identitynet", "#p-identitynet"],
    ["arcface", "#p-arcface"],
  ]) {
    if (text(id)) out[name] = text(id);
  }
  return out;
}

async function showResult(task) {
  const shortlist = task.metadata.shortlist || [];
  $("#p-shortlist-list").replaceChildren(
    ...shortlist.map((entry) => {
      const url = task.urls[`rank${entry.position}`];
      const img = el("img", { alt: `Rank ${entry.position}` });
      if (url) imageUrl(url).then((src) => (img.src = src));
      const qc = entry.qc || {};
      return el(
        "li",
        { className: "card" },
        el(
          "button",
          {
            type: "button",
            className: "open",
            title: "Download",
            onclick: guard(() => download(url, `rank${entry.position}`)),
          },
          img,
        ),
        el(
          "div",
          { className: "card-info scores" },
          el("strong", { textContent: `#${entry.position}` }),
          ` score ${qc.score ?? "—"} · identity ${qc.identity ?? "—"} · SSIM ${qc.ssim ?? "—"} · seed ${entry.seed}`,
        ),
      );
    }),
  );
  $("#p-warnings").textContent = (task.metadata.warnings || []).join(" ");
  $("#p-sheet").src = task.urls.contact_sheet ? await imageUrl(task.urls.contact_sheet) : "";
  $("#p-result").hidden = false;
}

async function submit(event) {
  event.preventDefault();
  clearError();
  const files = [...$("#p-selfies").files];
  if (files.length < 1 || files.length > 3) throw new Error("Choose 1 to 3 selfies.");
  const request = { ...body(), selfies: await Promise.all(files.map(asDataUrl)) };
  if (!request.prompt) throw new Error("Write a prompt first.");
  const {
    task_ids: [id],
  } = await api("/portrait", { json: request });
  $("#p-result").hidden = true;
  $("#p-submit").disabled = true;
  $("#p-cancel").hidden = false;
  running = { id, abort: new AbortController() };
  showStage("", 0, "queued");
  try {
    let stage = "";
    await followEvents(
      id,
      (e) => showStage((stage = e.stage || stage), e.progress, e.status),
      running.abort.signal,
    );
    const task = await api(`/image/task/${id}`);
    showStage(stage, task.progress, task.status);
    if (task.status === "succeeded") await showResult(task);
    else if (task.error) throw new Error(`portrait ${shortId(id)} ${task.status}: ${task.error}`);
  } finally {
    $("#p-submit").disabled = false;
    $("#p-cancel").hidden = true;
    running = null;
  }
}

export function initPortraits() {
  $("#p-selfies").addEventListener("change", showPreviews);
  $("#p-form").addEventListener("submit", guard(submit));
  $("#p-cancel").addEventListener(
    "click",
    guard(async () => {
      if (running) await api(`/image/task/${running.id}/cancel`, { method: "POST" });
    }),
  );
}
