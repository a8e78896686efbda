// Small DOM helpers shared by the views.

export const $ = (selector, root = document) => root.querySelector(selector);

/** Build an element: el("li", {className: "x", onclick}, child, "text", ...). */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name.startsWith("data-") || name.startsWith("aria-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  node.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

/** Show an error (an ApiError's message is the API's own words) in the banner at the top. */
export function showError(err) {
  const text = typeof err === "string" ? err : err.message || String(err);
  $("#error-text").textContent = text;
  $("#error").hidden = false;
  $("#error").scrollIntoView({ block: "nearest" });
}

export function clearError() {
  $("#error").hidden = true;
}

/** Run an async handler; any failure lands in the error banner. */
export function guard(handler) {
  return async (...args) => {
    try {
      await handler(...args);
    } catch (err) {
      showError(err);
    }
  };
}

export const shortId = (id) => id.slice(0, 8);

export function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "—";
}

export function statusBadge(status) {
  return el("span", { className: `badge ${status}`, textContent: status });
}

/** The prompt a person typed is the task's `params.prompt` (with the style's words, if any). */
export const promptOf = (task) => task.params?.prompt || task.task_type;

/** A table of name → value rows; objects and lists shown as JSON. */
export function fillTable(table, entries) {
  table.replaceChildren(
    ...entries.map(([name, value]) =>
      el(
        "tr",
        {},
        el("th", { textContent: name }),
        el("td", { textContent: typeof value === "object" ? JSON.stringify(value) : String(value) }),
      ),
    ),
  );
}

/** Switch the visible view (the tab buttons in the header call this too). */
export function showView(name) {
  for (const tab of document.querySelectorAll("nav [role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.view === name));
  }
  for (const section of document.querySelectorAll("main > section")) {
    section.hidden = section.dataset.view !== name;
  }
  document.dispatchEvent(new CustomEvent("view", { detail: name }));
}
