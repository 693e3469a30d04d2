// What every dashboard page's script uses: the login check, error messages, and reading a
// streamed response line by line. Loaded before the page's own script.
"use strict";

// A refused login (token changed, or logged out elsewhere) sends the browser to the login page.
function checkSignedIn(response) {
  if (response.status === 401) {
    window.location.assign("/dashboard/login?expired=1");
    throw new Error("not signed in");
  }
  return response;
}

// The message of an error reply: the management API's {"error": "..."} or the proxy's
// OpenAI-shaped {"error": {"message": "..."}}.
async function errorOf(response) {
  try {
    const body = await response.json();
    if (body.error && typeof body.error === "object") return body.error.message || response.statusText;
    return body.error || response.statusText;
  } catch {
    return response.status + " " + response.statusText;
  }
}

// Calls `onLine` with each complete line of a streamed response body as it arrives.
async function readLines(response, onLine) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    pending += decoder.decode(value, { stream: true });
    const lines = pending.split("\n");
    pending = lines.pop();
    lines.forEach(onLine);
  }
  if (pending) onLine(pending);
}
