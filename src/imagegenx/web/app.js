// The page's entry point: tabs, the API key, then each view.

import { getKey, setKey } from "./api.js";
import { initGallery, loadGallery } from "./gallery.js";
import { initGenerate, loadOptions } from "./generate.js";
import { initPortraits } from "./portraits.js";
import { initQueue, refreshQueue } from "./queue.js";
import { $, clearError, guard, showError, showView } from "./ui.js";

function keyButton() {
  $("#key-button").textContent = getKey() ? "API key ✓" : "API key";
}

function initKey() {
  $("#key-button").addEventListener("click", () => {
    $("#key-input").value = getKey();
    $("#key-dialog").showModal();
  });
  $("#key-form").addEventListener(
    "submit",
    guard(async () => {
      setKey($("#key-input").value.trim());
      keyButton();
      clearError();
      await start();
    }),
  );
  $("#key-clear").addEventListener("click", () => {
    setKey("");
    $("#key-input").value = "";
    keyButton();
  });
  keyButton();
}

/** Load what needs the key; without a valid one, ask for it. */
async function start() {
  try {
    await loadOptions();
  } catch (err) {
    showError(err);
    if (err.status === 401 && !$("#key-dialog").open) $("#key-dialog").showModal();
  }
}

const onView = {
  queue: () => refreshQueue(),
  gallery: () => loadGallery(),
};

for (const tab of document.querySelectorAll("nav [role=tab]")) {
  tab.addEventListener("click", () => showView(tab.dataset.view));
}
document.addEventListener(
  "view",
  guard((event) => onView[event.detail]?.()),
);
$("#error-close").addEventListener("click", clearError);
initKey();
initGenerate();
initQueue();
initGallery();
initPortraits();
start();
