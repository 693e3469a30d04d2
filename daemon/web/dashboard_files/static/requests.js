// The requests page: swap in the newest rows of the request log every few seconds. All
// rendering happens on the server.
"use strict";

const REQUESTS_POLL_MS = 1500;
const rowsBox = document.getElementById("request-rows");
let lastRows = null;

async function refreshRows() {
  let response;
  try {
    response = checkSignedIn(await fetch("/dashboard/requests/rows", { cache: "no-store" }));
  } catch {
    return; // the daemon is restarting, or we are leaving for the login page
  }
  if (!response.ok) return;
  const html = await response.text();
  if (html === lastRows) return; // unchanged: keep open bodies and the selection as they are
  const open = new Set([...rowsBox.querySelectorAll("details[open]")].map((d) => d.dataset.key));
  rowsBox.innerHTML = html;
  lastRows = html;
  for (const details of rowsBox.querySelectorAll("details")) {
    details.open = open.has(details.dataset.key);
  }
}

setInterval(refreshRows, REQUESTS_POLL_MS);
