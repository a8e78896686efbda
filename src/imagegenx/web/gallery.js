// The Gallery view: this key's history with filters, a detail view, single and ZIP downloads.

import { api, download, imageUrl } from "./api.js";
import { fillForm } from "./generate.js";
import { $, el, guard, fillTable, shortId, statusBadge, when, promptOf, showView } from "./ui.js";

const PAGE_SIZE = 24;
let page = 1;
let total = 0;
let current = null; // the task shown in the detail view
const selected = new Set();

function query() {
  const q = new URLSearchParams({ page, page_size: PAGE_SIZE });
  const since = $("#h-since").value;
  if (since) q.set("since", String(Date.now() / 1000 - Number(since)));
  for (const [name, id] of [
    ["style", "#h-style"],
    ["status", "#h-status"],
    ["resolution", "#h-resolution"],
  ]) {
    const v = $(id).value.trim();
    if (v) q.set(name, v);
  }
  return q;
}

function card(task) {
  const check = el("input", {
    type: "checkbox",
    className: "pick",
    checked: selected.has(task.task_id),
    disabled: !task.urls.original,
    "aria-label": `Select ${shortId(task.task_id)}`,
    onchange: () => {
      check.checked ? selected.add(task.task_id) : selected.delete(task.task_id);
      $("#h-zip").disabled = selected.size === 0;
    },
  });
  const thumb = task.urls["256"] || task.urls.original;
  const img = thumb
    ? el("img", { alt: promptOf(task) })
    : el("span", { className: "no-image", textContent: "no image" });
  if (thumb)
    imageUrl(thumb).then(
      (url) => (img.src = url),
      () => {},
    );
  const size = task.width ? `${task.width}×${task.height}` : task.task_type;
  return el(
    "li",
    { className: "card", "data-task": task.task_id, "data-status": task.status },
    el("button", { type: "button", className: "open", onclick: () => openDetail(task) }, img),
    el(
      "div",
      { className: "card-info" },
      check,
      statusBadge(task.status),
      el("span", { textContent: ` ${size}${task.style ? " · " + task.style : ""}` }),
    ),
  );
}

export async function loadGallery() {
  const data = await api(`/image/tasks?${query()}`);
  total = data.total;
  $("#h-grid").replaceChildren(...data.items.map(card));
  $("#h-empty").hidden = data.items.length > 0;
  const pages = Math.max(1, Math.ceil(total / PAGE_SIZE));
  $("#h-page").textContent = `page ${page} of ${pages} · ${total} tasks`;
  $("#h-prev").disabled = page <= 1;
  $("#h-next").disabled = page >= pages;
  $("#h-zip").disabled = selected.size === 0;
}

// Detail --------------------------------------------------------------------------------------

function qcRows(task) {
  const meta = task.metadata || {};
  if (meta.qc) return Object.entries(meta.qc).filter(([, v]) => v !== null);
  if (meta.shortlist)
    return meta.shortlist.map((s) => [`#${s.position} seed ${s.seed}`, `score ${s.qc.score}`]);
  return [["—", "not scored (turn on QC scores when generating)"]];
}

function openDetail(task) {
  current = task;
  $("#d-title").textContent = `${task.task_type} ${shortId(task.task_id)} · ${task.status}`;
  $("#d-error").hidden = !task.error;
  $("#d-error").textContent = task.error || "";
  $("#d-image").removeAttribute("src");
  const big = task.urls["512"] || task.urls.original;
  if (big) imageUrl(big).then((url) => ($("#d-image").src = url));
  $("#d-downloads").replaceChildren(
    ...Object.keys(task.urls).map((version) =>
      el("button", {
        type: "button",
        className: version === "original" ? "" : "secondary",
        textContent: `Download ${version}`,
        onclick: guard(() => download(task.urls[version], `${task.task_id}-${version}`)),
      }),
    ),
  );
  fillTable($("#d-qc"), qcRows(task));
  const info = [
    ["task id", task.task_id],
    ["created", when(task.created_at)],
    ["finished", when(task.finished_at)],
    ["style", task.style || "none"],
    ...Object.entries(task.params).filter(([name]) => name !== "selfies"),
  ];
  if (task.metadata?.timings) info.push(["timings (s)", task.metadata.timings]);
  fillTable($("#d-params"), info);
  $("#d-reuse").hidden = task.task_type === "portrait";
  $("#detail").showModal();
}

function reuse() {
  fillForm(current.params);
  $("#detail").close();
  showView("generate");
}

export function initGallery() {
  $("#h-filters").addEventListener(
    "submit",
    guard(async (event) => {
      event.preventDefault();
      page = 1;
      await loadGallery();
    }),
  );
  $("#h-prev").addEventListener(
    "click",
    guard(() => ((page -= 1), loadGallery())),
  );
  $("#h-next").addEventListener(
    "click",
    guard(() => ((page += 1), loadGallery())),
  );
  $("#h-select-all").addEventListener("change", (event) => {
    for (const box of document.querySelectorAll("#h-grid .pick:not(:disabled)")) {
      box.checked = event.target.checked;
      box.dispatchEvent(new Event("change"));
    }
  });
  $("#h-zip").addEventListener(
    "click",
    guard(() => download(`/api/v1/image/download.zip?task_ids=${[...selected].join(",")}`, "images.zip")),
  );
  $("#d-close").addEventListener("click", () => $("#detail").close());
  $("#d-reuse").addEventListener("click", reuse);
}
