// The dashboard's Deliveries view: one webhook's deliveries (newest first, filtered by status, paged), one
// delivery's payload and attempts, and the sends an admin may queue (resend, recover, test). It uses the page's
// helpers from dashboard.js ($, state, api, say, messageOf, webhooksPath, button, cell).
"use strict";

const deliveriesState = { webhook: null, cursors: [""], page: 0, next: null, items: [], open: null };

function deliveriesPath(suffix) {
  return webhooksPath(deliveriesState.webhook.id, suffix);
}

function when(text) {
  const date = new Date(text);
  return isNaN(date) ? text : date.toLocaleString();
}

function lastResult(d) {
  if (d.lastStatus !== null && d.lastStatus !== undefined) return "HTTP " + d.lastStatus;
  if (d.lastError) return d.lastError;
  return "—";
}

function attemptResult(a) {
  if (a.status !== undefined) return "HTTP " + a.status;
  if (a.error) return a.error;
  return a.reason ? "not sent: " + a.reason : "—";
}

// Opened from a webhook's row (dashboard.js).
function openDeliveries(w) {
  deliveriesState.webhook = w;
  deliveriesState.cursors = [""];
  deliveriesState.page = 0;
  $("d-status").value = "";
  $("d-title").textContent = "Deliveries of " + w.name;
  $("webhooks").hidden = true;
  $("deliveries").hidden = false;
  say("");
  loadDeliveries().then(() => $("d-title").focus());
}

function closeDeliveries() {
  const id = deliveriesState.webhook && deliveriesState.webhook.id;
  $("deliveries").hidden = true;
  $("webhooks").hidden = false;
  say("");
  load().then(() => focusRow(id, "Deliveries"));
}

async function loadDeliveries() {
  const query = new URLSearchParams();
  const status = $("d-status").value;
  if (status) query.set("status", status);
  const cursor = deliveriesState.cursors[deliveriesState.page];
  if (cursor) query.set("cursor", cursor);
  const answer = await api("GET", deliveriesPath("deliveries") + "?" + query.toString());
  if (answer.status !== 200) {
    say(messageOf(answer.data) || "The registry answered " + answer.status + ".");
    return;
  }
  deliveriesState.items = answer.data.deliveries;
  deliveriesState.next = answer.data.next;
  renderDeliveries();
}

function renderDeliveries() {
  const rows = $("d-rows");
  rows.replaceChildren();
  for (const d of deliveriesState.items) {
    const tr = document.createElement("tr");
    tr.dataset.event = d.eventId;
    cell(tr, "Time", when(d.createdAt));
    cell(tr, "Event", d.eventId, "mono");
    cell(tr, "Type", d.eventType);
    const badge = document.createElement("span");
    badge.className = "badge " + d.status;
    badge.textContent = d.status[0].toUpperCase() + d.status.slice(1);
    cell(tr, "Status", badge);
    cell(tr, "Attempts", String(d.attemptCount));
    cell(tr, "Last status", lastResult(d));
    cell(tr, "Details", button("Details", "secondary", () => openDelivery(d.eventId), "Details of event " + d.eventId));
    rows.append(tr);
  }
  const empty = deliveriesState.items.length === 0;
  $("d-table").hidden = empty;
  $("d-empty").hidden = !empty;
  $("d-newer").hidden = deliveriesState.page === 0;
  $("d-older").hidden = !deliveriesState.next;
  $("d-page").textContent = empty && deliveriesState.page === 0 ? "" : "Page " + (deliveriesState.page + 1);
}

async function openDelivery(eventId) {
  const answer = await api("GET", deliveriesPath("deliveries/" + encodeURIComponent(eventId)));
  if (answer.status !== 200) return say(messageOf(answer.data) || "The registry answered " + answer.status + ".");
  const d = answer.data;
  deliveriesState.open = d;
  $("dd-title").textContent = "Event " + d.eventId;
  $("dd-type").textContent = d.eventType;
  $("dd-status").textContent = d.status;
  $("dd-created").textContent = when(d.createdAt);
  let payload = "The payload was not kept (it was larger than the proxy keeps).";
  if (d.payload !== null) {
    try {
      payload = JSON.stringify(JSON.parse(d.payload), null, 2);
    } catch (e) {
      payload = d.payload;
    }
  }
  $("dd-payload").textContent = payload;
  const rows = $("dd-attempts");
  rows.replaceChildren();
  for (const a of d.attempts) {
    const tr = document.createElement("tr");
    cell(tr, "Attempt", String(a.attempt));
    cell(tr, "Time", when(a.at));
    cell(tr, "Result", attemptResult(a));
    cell(tr, "Latency", a.latencyMs === undefined ? "—" : a.latencyMs + " ms");
    cell(tr, "Outcome", a.outcome + (a.sendId ? " (send " + a.sendId + ")" : ""));
    rows.append(tr);
  }
  $("dd-none").hidden = d.attempts.length !== 0;
  $("dd-resend").disabled = d.payload === null;
  $("delivery").showModal();
  $("dd-close").focus();
}

$("d-back").addEventListener("click", closeDeliveries);
$("d-refresh").addEventListener("click", async () => {
  await loadDeliveries();
  say("Deliveries reloaded.");
});
$("d-status").addEventListener("change", () => {
  deliveriesState.cursors = [""];
  deliveriesState.page = 0;
  loadDeliveries();
});
$("d-older").addEventListener("click", async () => {
  deliveriesState.cursors[deliveriesState.page + 1] = deliveriesState.next;
  deliveriesState.page += 1;
  await loadDeliveries();
  ($("d-older").hidden ? $("d-newer") : $("d-older")).focus();
});
$("d-newer").addEventListener("click", async () => {
  deliveriesState.page = Math.max(0, deliveriesState.page - 1);
  await loadDeliveries();
  ($("d-newer").hidden ? $("d-older").hidden ? $("d-status") : $("d-older") : $("d-newer")).focus();
});

$("dd-close").addEventListener("click", () => $("delivery").close());
$("delivery").addEventListener("close", () => {
  const d = deliveriesState.open;
  const row = d && document.querySelector(`tr[data-event="${CSS.escape(d.eventId)}"] button`);
  if (row) row.focus();
});
$("dd-resend").addEventListener("click", async () => {
  const d = deliveriesState.open;
  const answer = await api("POST", deliveriesPath("deliveries/" + encodeURIComponent(d.eventId) + "/resend"));
  $("delivery").close();
  if (answer.status !== 202) return say(messageOf(answer.data) || "Could not resend it.");
  await loadDeliveries();
  say(answer.data.queued
    ? `Event ${d.eventId} is queued to be sent again, with the same webhook-id.`
    : `Event ${d.eventId} is already queued to be sent again.`);
});

$("d-test").addEventListener("click", async () => {
  const answer = await api("POST", deliveriesPath("test"));
  if (answer.status !== 202) return say(messageOf(answer.data) || "Could not send a test event.");
  await loadDeliveries();
  say(`Test event ${answer.data.eventId} (${answer.data.eventType}) is queued; a proxy signs and sends it.`);
});

// datetime-local values are local times without a zone: "YYYY-MM-DDTHH:MM".
function localInputValue(date) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}T${pad(date.getHours())}:${pad(date.getMinutes())}`;
}

$("d-recover").addEventListener("click", () => {
  $("r-error").textContent = "";
  const now = new Date();
  $("r-since").max = localInputValue(now);
  $("r-since").value = localInputValue(new Date(now.getTime() - 24 * 3600 * 1000));
  $("recover").showModal();
  $("r-since").focus();
});
$("r-cancel").addEventListener("click", () => $("recover").close());
$("recover").addEventListener("close", () => $("d-recover").focus());
$("recover-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const since = new Date($("r-since").value);
  if (!$("r-since").value || isNaN(since)) {
    $("r-error").textContent = "Choose a date and time.";
    $("r-since").focus();
    return;
  }
  const answer = await api("POST", deliveriesPath("recover"), { since: since.toISOString() });
  if (answer.status !== 202) {
    $("r-error").textContent = messageOf(answer.data) || "The registry answered " + answer.status + ".";
    return;
  }
  $("recover").close();
  await loadDeliveries();
  const { queued, more, notKept } = answer.data;
  let message = `${queued} failed deliveries since ${since.toLocaleString()} are queued to be sent again.`;
  if (more) message += " More are left: recover again for the next ones.";
  if (notKept) message += ` ${notKept} could not be: their payload was not kept.`;
  say(message);
});
