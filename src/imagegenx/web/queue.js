// The Queue view: this key's queued and running tasks, live progress over SSE, cancel.

import { api, followEvents, imageUrl, FINAL } from "./api.js";
import { $, el, guard, showError, shortId, statusBadge, promptOf } from "./ui.js";

// A browser keeps at most 6 connections to one server over HTTP/1.1: a few live streams at once,
// the other tasks wait for a free one (they are queued anyway).
const MAX_STREAMS = 3;

const tasks = new Map(); // task id → {view, item, streaming}
let streams = 0;

/** The row's elements, made once: progress events update them in place, so the Cancel button
 * stays put (a row rebuilt at every event would never be still long enough to click). */
function build(entry) {
  const id = entry.view.task_id;
  const parts = {
    thumb: el("img", { className: "thumb", alt: "" }),
    badge: el("span"),
    title: el("span"),
    prompt: el("div", { className: "prompt" }),
    progress: el("progress", { max: 100, value: 0 }),
    percent: el("span", { className: "percent" }),
    error: el("div", { className: "error-text", hidden: true }),
    cancel: el("button", {
      type: "button",
      className: "secondary cancel",
      textContent: "Cancel",
      onclick: guard(() => cancelTask(id)),
    }),
  };
  entry.item.replaceChildren(
    parts.thumb,
    el(
      "div",
      { className: "task-info" },
      el("div", {}, parts.badge, " ", el("code", { textContent: shortId(id) }), parts.title),
      parts.prompt,
      el("div", { className: "progress-line" }, parts.progress, parts.percent),
      parts.error,
    ),
    parts.cancel,
  );
  return parts;
}

function render(entry) {
  const { view } = entry;
  const parts = (entry.parts ||= build(entry));
  const final = FINAL.has(view.status);
  const badge = statusBadge(view.status);
  parts.badge.className = badge.className;
  parts.badge.textContent = badge.textContent;
  parts.title.textContent = ` ${view.task_type}${view.width ? ` ${view.width}×${view.height}` : ""}`;
  parts.prompt.textContent = promptOf(view);
  parts.progress.value = final && view.status === "succeeded" ? 100 : view.progress;
  parts.percent.textContent = `${parts.progress.value}%${entry.stage ? ` · ${entry.stage}` : ""}`;
  parts.error.textContent = view.error || "";
  parts.error.hidden = !view.error;
  parts.cancel.disabled = final;
  const result = view.urls["256"] || view.urls.original;
  if (result && parts.shown !== result) {
    parts.shown = result;
    imageUrl(result).then(
      (url) => (parts.thumb.src = url),
      () => {},
    );
  } else if (!result && entry.preview && !final) parts.thumb.src = entry.preview; // latents as RGB
  entry.item.dataset.status = view.status;
  $("#q-empty").hidden = tasks.size > 0;
}

async function refreshTask(id) {
  const entry = tasks.get(id);
  entry.view = await api(`/image/task/${id}`);
  render(entry);
}

async function follow(entry) {
  entry.streaming = true;
  streams += 1;
  const id = entry.view.task_id;
  try {
    await followEvents(id, (event) => {
      entry.view.status = event.status;
      entry.view.progress = event.progress;
      entry.stage = event.stage || "";
      if (event.preview) entry.preview = event.preview;
      render(entry);
    });
    await refreshTask(id); // the final state carries the result URLs and any error
  } catch (err) {
    showError(err);
  } finally {
    streams -= 1;
    entry.streaming = false;
    startStreams();
  }
}

function startStreams() {
  for (const entry of tasks.values()) {
    if (streams >= MAX_STREAMS) return;
    if (!entry.streaming && !FINAL.has(entry.view.status)) follow(entry);
  }
}

function add(view) {
  let entry = tasks.get(view.task_id);
  if (!entry) {
    entry = {
      view,
      item: el("li", { className: "task", "data-task": view.task_id }),
      streaming: false,
      stage: "",
    };
    tasks.set(view.task_id, entry);
    $("#q-list").prepend(entry.item);
  } else if (!entry.streaming) {
    entry.view = view;
  }
  render(entry);
}

/** Show a task just submitted (from Generate) and follow its progress. */
export const track = guard(async (id) => {
  add(await api(`/image/task/${id}`));
  startStreams();
});

async function cancelTask(id) {
  const view = await api(`/image/task/${id}/cancel`, { method: "POST" });
  const entry = tasks.get(id);
  if (!entry.streaming) {
    entry.view = view;
    render(entry);
  }
}

/** Load every queued and running task of this key (oldest first, so the newest ends on top);
 * `prune` also drops the finished ones from the list (the Gallery keeps them). */
export async function refreshQueue(prune = false) {
  const pages = await Promise.all(
    ["queued", "processing"].map((status) => api(`/image/tasks?status=${status}&page_size=100`)),
  );
  const views = pages.flatMap((page) => page.items).sort((a, b) => a.created_at - b.created_at);
  for (const view of views) add(view);
  for (const [id, entry] of tasks) {
    if (prune && FINAL.has(entry.view.status) && !entry.streaming) {
      entry.item.remove();
      tasks.delete(id);
    }
  }
  $("#q-empty").hidden = tasks.size > 0;
  startStreams();
}

export function initQueue() {
  $("#q-refresh").addEventListener(
    "click",
    guard(() => refreshQueue(true)),
  );
}
