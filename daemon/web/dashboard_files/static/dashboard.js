// The dashboard's behaviour: refresh the status fragment, drive load/unload through the
// management API, and follow a model's log. All rendering happens on the server. common.js,
// loaded first, has the login check, error messages and line reading.
"use strict";

const POLL_MS = 1500;
const MAX_LOG_CHARS = 200000;
const statusBox = document.getElementById("status");
const notice = document.getElementById("notice");
const logs = {
  box: document.getElementById("logs"),
  model: document.getElementById("log-model"),
  text: document.getElementById("log-text"),
  abort: null,
};
let lastStatus = null;

function say(message, isError = false) {
  notice.textContent = message;
  notice.classList.toggle("error", isError);
}

function modelUrl(model, action) {
  return "/v1/models/" + encodeURIComponent(model) + "/" + action;
}

async function refresh() {
  let response;
  try {
    response = checkSignedIn(await fetch("/dashboard/status", { cache: "no-store" }));
  } catch {
    return; // the daemon is restarting, or we are leaving for the login page
  }
  if (!response.ok) {
    say("Could not refresh: " + (await errorOf(response)), true);
    return;
  }
  const html = await response.text();
  if (html === lastStatus) {
    return; // unchanged: keep focus and open details as they are
  }
  const open = new Set([...statusBox.querySelectorAll("details[open]")].map((d) => d.dataset.key));
  statusBox.innerHTML = html;
  lastStatus = html;
  for (const details of statusBox.querySelectorAll("details")) {
    details.open = open.has(details.dataset.key);
  }
}

async function load(model) {
  say("Loading " + model + "…");
  const response = checkSignedIn(await fetch(modelUrl(model, "load"), { method: "POST" }));
  if (!response.ok) {
    say("Could not load " + model + ": " + (await errorOf(response)), true);
    return;
  }
  await readLines(response, (line) => {
    if (!line.trim()) return;
    const event = JSON.parse(line);
    if (event.event === "progress") {
      say("Loading " + model + " (" + event.elapsed_s + " s): " + (event.message || event.log || "starting"));
    } else if (event.event === "ready") {
      say(model + " is ready.");
    } else if (event.event === "error") {
      say("Could not load " + model + ": " + event.message, true);
    }
    refresh();
  });
}

async function unload(model) {
  say("Unloading " + model + "…");
  const response = checkSignedIn(await fetch(modelUrl(model, "unload"), { method: "POST" }));
  if (!response.ok) {
    say("Could not unload " + model + ": " + (await errorOf(response)), true);
    return;
  }
  const body = await response.json();
  say(body.unloaded ? model + " is unloaded." : model + " was not running.");
}

function closeLogs() {
  if (logs.abort) logs.abort.abort();
  logs.abort = null;
  logs.box.hidden = true;
}

async function followLogs(model) {
  closeLogs();
  const abort = new AbortController();
  logs.abort = abort;
  logs.model.textContent = model;
  logs.text.textContent = "";
  logs.box.hidden = false;
  try {
    const url = modelUrl(model, "logs") + "?lines=200&follow=1";
    const response = checkSignedIn(await fetch(url, { signal: abort.signal }));
    if (!response.ok) {
      logs.text.textContent = "Could not read the log: " + (await errorOf(response));
      return;
    }
    await readLines(response, (line) => {
      const atBottom = logs.text.scrollTop + logs.text.clientHeight >= logs.text.scrollHeight - 4;
      let text = logs.text.textContent + line + "\n";
      if (text.length > MAX_LOG_CHARS) text = text.slice(text.length - MAX_LOG_CHARS);
      logs.text.textContent = text;
      if (atBottom) logs.text.scrollTop = logs.text.scrollHeight;
    });
  } catch (error) {
    if (error.name !== "AbortError") logs.text.textContent += "\n[log stream ended: " + error.message + "]";
  }
}

const actions = { load, unload, logs: followLogs };

statusBox.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const { action, model } = button.dataset;
  button.disabled = true;
  try {
    await actions[action](model);
  } catch (error) {
    if (error.message !== "not signed in") say(action + " " + model + " failed: " + error.message, true);
  } finally {
    button.disabled = false;
    refresh();
  }
});
document.getElementById("log-close").addEventListener("click", closeLogs);

setInterval(refresh, POLL_MS);
