// The playground: chat with a profile through the proxy (`POST /dashboard/playground/chat`,
// which the daemon hands to `POST /v1/chat/completions`), streamed, with the time to first
// token and the generation speed. A model that is not ready is loaded first, showing progress.
"use strict";

const chat = {
  form: document.getElementById("chat-form"),
  model: document.getElementById("chat-model"),
  maxTokens: document.getElementById("chat-max-tokens"),
  transcript: document.getElementById("chat-transcript"),
  status: document.getElementById("chat-status"),
  ttft: document.getElementById("chat-ttft"),
  tokens: document.getElementById("chat-tokens"),
  speed: document.getElementById("chat-speed"),
  input: document.getElementById("chat-input"),
  send: document.getElementById("chat-send"),
  stop: document.getElementById("chat-stop"),
  clear: document.getElementById("chat-clear"),
};
// The conversation so far, as the chat API takes it; every request sends all of it.
let messages = [];
let abort = null;

function say(message, isError = false) {
  chat.status.textContent = message;
  chat.status.classList.toggle("error", isError);
}

function seconds(ms) {
  return ms < 1000 ? Math.round(ms) + " ms" : (ms / 1000).toFixed(2) + " s";
}

function showStats(ttftMs, tokens, perSecond) {
  chat.ttft.textContent = ttftMs === null ? "-" : seconds(ttftMs);
  chat.tokens.textContent = tokens === null ? "-" : String(tokens);
  chat.speed.textContent = perSecond === null || !isFinite(perSecond) ? "-" : perSecond.toFixed(1);
}

// A message in the transcript; returns the element its text goes in.
function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = "message " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : chat.model.value;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  box.append(who, body);
  chat.transcript.append(box);
  chat.transcript.scrollTop = chat.transcript.scrollHeight;
  return body;
}

async function modelStates() {
  const response = checkSignedIn(await fetch("/v1/ps", { cache: "no-store" }));
  if (!response.ok) throw new Error(await errorOf(response));
  return new Map((await response.json()).models.map((row) => [row.model, row.state]));
}

async function showStates() {
  const states = await modelStates();
  for (const option of chat.model.options) {
    option.textContent = option.value + " (" + (states.get(option.value) || "stopped") + ")";
  }
  return states;
}

// Loads `model` unless it is ready, showing the load's progress; whether it is ready.
async function ensureLoaded(model, signal) {
  if ((await modelStates()).get(model) === "ready") return true;
  say("Loading " + model + "…");
  const url = "/v1/models/" + encodeURIComponent(model) + "/load";
  const response = checkSignedIn(await fetch(url, { method: "POST", signal }));
  if (!response.ok) {
    say("Could not load " + model + ": " + (await errorOf(response)), true);
    return false;
  }
  let ready = false;
  await readLines(response, (line) => {
    if (!line.trim()) return;
    const event = JSON.parse(line);
    if (event.event === "progress") {
      say("Loading " + model + " (" + event.elapsed_s + " s): " + (event.message || event.log || "starting"));
    } else if (event.event === "ready") {
      ready = true;
      say(model + " is loaded.");
    } else if (event.event === "error") {
      say("Could not load " + model + ": " + event.message, true);
    }
  });
  showStates().catch(() => {});
  return ready;
}

// Streams the reply to `messages` into `textBox`; returns the reply's text.
async function streamReply(model, textBox, signal) {
  const started = performance.now();
  const body = { model, messages, stream: true };
  const maxTokens = parseInt(chat.maxTokens.value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const response = checkSignedIn(await fetch("/dashboard/playground/chat", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal,
  }));
  if (!response.ok) throw new Error(await errorOf(response));
  let first = null;
  let last = null;
  let pieces = 0;
  let answer = "";
  let thinking = "";
  let engine = {}; // the engine's own figures: llama-server's `timings`, or `usage`
  await readLines(response, (line) => {
    if (!line.startsWith("data:")) return;
    const data = line.slice(5).trim();
    if (!data || data === "[DONE]") return;
    const event = JSON.parse(data);
    if (event.error) throw new Error(event.error.message || String(event.error));
    if (event.timings) engine.timings = event.timings;
    if (event.usage) engine.usage = event.usage;
    const delta = event.choices && event.choices[0] && event.choices[0].delta;
    if (!delta) return;
    const piece = delta.content || "";
    const thought = delta.reasoning_content || "";
    if (!piece && !thought) return;
    last = performance.now();
    if (first === null) first = last;
    pieces += 1;
    answer += piece;
    thinking += thought;
    textBox.textContent = thinking ? "[thinking] " + thinking + (answer ? "\n\n" + answer : "") : answer;
    chat.transcript.scrollTop = chat.transcript.scrollHeight;
    showStats(first - started, pieces, pieces > 1 ? (pieces - 1) / ((last - first) / 1000) : null);
  });
  // Once the reply is complete, the engine's own counts are more exact than counting pieces.
  const timings = engine.timings || {};
  const usage = engine.usage || {};
  const tokens = timings.predicted_n ?? usage.completion_tokens ?? pieces;
  let perSecond = timings.predicted_per_second ?? null;
  if (perSecond === null && tokens > 1 && last > first) perSecond = (tokens - 1) / ((last - first) / 1000);
  showStats(first === null ? null : first - started, tokens, perSecond);
  if (first === null) textBox.textContent = "(no text)";
  return answer;
}

function setBusy(busy) {
  chat.send.disabled = busy;
  chat.stop.disabled = !busy;
  chat.model.disabled = busy;
}

async function send(event) {
  event.preventDefault();
  const text = chat.input.value.trim();
  if (!text || abort) return;
  const model = chat.model.value;
  abort = new AbortController();
  setBusy(true);
  chat.input.value = "";
  addMessage("user", text);
  messages.push({ role: "user", content: text });
  let textBox = null;
  try {
    if (!(await ensureLoaded(model, abort.signal))) {
      messages.pop();
      return;
    }
    say("Waiting for " + model + "…");
    showStats(null, null, null);
    textBox = addMessage("assistant", "");
    const answer = await streamReply(model, textBox, abort.signal);
    messages.push({ role: "assistant", content: answer });
    say("");
  } catch (error) {
    if (error.name === "AbortError") {
      say("Stopped.");
      const partial = textBox ? textBox.textContent : "";
      if (partial) messages.push({ role: "assistant", content: partial });
      else messages.pop();
    } else if (error.message !== "not signed in") {
      messages.pop();
      if (textBox) textBox.parentElement.classList.add("failed");
      say("The request failed: " + error.message, true);
    }
  } finally {
    abort.abort(); // ends a stream the reader left early, so the engine stops generating
    abort = null;
    setBusy(false);
    chat.input.focus();
  }
}

if (chat.form) {
  chat.form.addEventListener("submit", send);
  chat.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      chat.form.requestSubmit();
    }
  });
  chat.stop.addEventListener("click", () => {
    if (abort) abort.abort();
  });
  chat.clear.addEventListener("click", () => {
    if (abort) abort.abort();
    messages = [];
    chat.transcript.textContent = "";
    showStats(null, null, null);
    say("");
  });
}
