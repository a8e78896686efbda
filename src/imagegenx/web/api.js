// Talking to the imagegenx API: the key from localStorage on every call, the API's own error
// messages as exceptions, images fetched with the key (an <img src> cannot send it), SSE over fetch.

const KEY = "imagegenx.apiKey";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export const getKey = () => localStorage.getItem(KEY) || "";
export const setKey = (key) => (key ? localStorage.setItem(KEY, key) : localStorage.removeItem(KEY));

function headers(extra = {}) {
  const key = getKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.message) message = body.message;
  } catch {
    /* not JSON: keep the status line */
  }
  if (response.status === 401) message += " — enter a valid API key (button at the top right)";
  return new ApiError(response.status, message);
}

async function send(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: headers(options.headers) });
  } catch (err) {
    throw new ApiError(0, `cannot reach the server (${err.message})`);
  }
  if (!response.ok) throw await failure(response);
  return response;
}

/** A native API call; returns the envelope's `data`. `json` sends a JSON body, `form` a FormData. */
export async function api(path, { method, json, form } = {}) {
  const options = { method: method || (json || form ? "POST" : "GET") };
  if (json !== undefined) {
    options.body = JSON.stringify(json);
    options.headers = { "Content-Type": "application/json" };
  } else if (form) {
    options.body = form;
  }
  const response = await send(`/api/v1${path}`, options);
  return (await response.json()).data;
}

/** Bytes of any API URL (a result image, a ZIP) as a Blob. */
export async function fetchBlob(url) {
  return (await send(url)).blob();
}

const objectUrls = new Map();

/** An object URL for an image the API serves; cached, since results never change. */
export async function imageUrl(url) {
  if (!objectUrls.has(url))
    objectUrls.set(
      url,
      fetchBlob(url).then((b) => URL.createObjectURL(b)),
    );
  try {
    return await objectUrls.get(url);
  } catch (err) {
    objectUrls.delete(url);
    throw err;
  }
}

/** Save an API URL's bytes as a file the browser downloads, named as the server names it. */
export async function download(url, fallbackName) {
  const response = await send(url);
  const named = /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") || "");
  const filename = named ? named[1] : fallbackName;
  const blob = await response.blob();
  const link = Object.assign(document.createElement("a"), {
    href: URL.createObjectURL(blob),
    download: filename,
  });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

/**
 * Follow a task's Server-Sent Events; `onEvent` gets each event's data ({status, progress, stage?}).
 * EventSource cannot send an Authorization header, so this reads the stream with fetch.
 * Resolves when the stream ends (the task is final) or `signal` aborts.
 */
export async function followEvents(taskId, onEvent, signal) {
  const response = await send(`/api/v1/image/task/${taskId}/events`, { signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replaceAll("\r\n", "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (data) onEvent(JSON.parse(data));
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") throw err;
  }
}

export const FINAL = new Set(["succeeded", "failed", "canceled", "expired"]);
