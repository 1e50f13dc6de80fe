// The registry's dashboard: plain JavaScript, no framework. The token lives in sessionStorage (this tab only);
// a new API key lives only in the page, so leaving or reloading the page loses it, as the warning says.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { token: "", organisation: "", eventTypes: [], rotationGraceSeconds: 0, webhooks: [], editing: null };

function say(message) {
  $("status").textContent = message;
}

function claims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
  } catch (e) {
    return null;
  }
}

async function api(method, path, body) {
  const options = { method, headers: { Authorization: "Bearer " + state.token } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let data = null;
  if (response.status !== 204) {
    try {
      data = await response.json();
    } catch (e) {
      data = null;
    }
  }
  if (response.status === 401) {
    signOut(messageOf(data) || "Your token was refused; sign in again.");
    throw new Error("unauthorised");
  }
  return { status: response.status, data };
}

function messageOf(data) {
  return data && data.errors && data.errors.length ? data.errors.map((e) => e.message).join("; ") : "";
}

function webhooksPath(id, action) {
  let path = "/v1/organisations/" + encodeURIComponent(state.organisation) + "/webhooks";
  if (id) path += "/" + encodeURIComponent(id);
  if (action) path += "/" + action;
  return path;
}

// --- signing in and out ---

function showSignedIn(signedIn) {
  $("sign-in").hidden = signedIn;
  $("webhooks").hidden = !signedIn;
  $("sign-out").hidden = !signedIn;
  $("deliveries").hidden = true;
  const c = signedIn ? claims(state.token) : null;
  $("who").textContent = c ? `${c.sub} (${c.role}) · organisation ${state.organisation}` : "";
}

function signOut(message) {
  sessionStorage.removeItem("registry.token");
  sessionStorage.removeItem("registry.organisation");
  state.token = "";
  hideKey();
  showSignedIn(false);
  say(message || "Signed out.");
  $("token").focus();
}

async function signIn(token, organisation) {
  state.token = token;
  state.organisation = organisation;
  const ok = await load();
  if (!ok) return;
  sessionStorage.setItem("registry.token", token);
  sessionStorage.setItem("registry.organisation", organisation);
  showSignedIn(true);
  say("");
  $("create").focus();
}

$("token").addEventListener("input", () => {
  const c = claims($("token").value.trim());
  if (c && typeof c.organisationId === "string") $("organisation").value = c.organisationId;
});

$("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  const c = claims(token);
  $("token-error").textContent = "";
  if (!c) {
    $("token-error").textContent = "This is not a token (a JWT has three parts separated by dots).";
    $("token").focus();
    return;
  }
  const organisation = $("organisation").value.trim() || c.organisationId || "";
  try {
    await signIn(token, organisation);
  } catch (e) {
    /* said already */
  }
});

$("sign-out").addEventListener("click", () => signOut());

// --- the table ---

async function load() {
  const [settings, list] = await Promise.all([
    fetch("/v1/settings").then((r) => r.json()),
    api("GET", webhooksPath()),
  ]);
  state.eventTypes = settings.eventTypes || [];
  state.rotationGraceSeconds = settings.rotationGraceSeconds || 0;
  if (list.status !== 200) {
    $("token-error").textContent = messageOf(list.data) || "The registry answered " + list.status + ".";
    if (!$("webhooks").hidden) say(messageOf(list.data));
    return false;
  }
  state.webhooks = list.data.webhooks;
  render();
  return true;
}

function button(text, className, onClick, label) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  if (className) b.className = className;
  if (label) b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

function cell(row, label, content, className) {
  const td = document.createElement("td");
  td.dataset.label = label;
  if (className) td.className = className;
  if (typeof content === "string") td.textContent = content;
  else td.append(content);
  row.append(td);
  return td;
}

function render() {
  const rows = $("rows");
  rows.replaceChildren();
  $("webhooks-title").textContent = "Webhooks of " + state.organisation;
  for (const w of state.webhooks) {
    const tr = document.createElement("tr");
    tr.dataset.id = w.id;
    const name = document.createElement("div");
    const strong = document.createElement("strong");
    strong.textContent = w.name;
    name.append(strong);
    if (w.description) {
      const d = document.createElement("div");
      d.className = "help";
      d.textContent = w.description;
      name.append(d);
    }
    if (w.previousKeyExpiresAt) {
      const p = document.createElement("div");
      p.className = "help previous-key";
      p.textContent = "The previous key also works until " + new Date(w.previousKeyExpiresAt).toLocaleString() + ".";
      name.append(p);
    }
    cell(tr, "Name", name);
    cell(tr, "URL", w.url, "url");
    cell(tr, "Events", w.events.join(", "));
    const badge = document.createElement("span");
    badge.className = "badge " + w.status;
    badge.textContent = w.status === "enabled" ? "Enabled" : "Disabled";
    const status = cell(tr, "Status", badge);
    if (w.disabledReason) status.append(Object.assign(document.createElement("p"), { className: "help reason", textContent: w.disabledReason }));
    const actions = document.createElement("div");
    actions.className = "row-actions";
    const toggle = w.status === "enabled" ? "Disable" : "Enable";
    actions.append(
      button("Deliveries", "secondary", () => openDeliveries(w), "Deliveries of " + w.name),
      button("Edit", "secondary", () => openEditor(w), "Edit " + w.name),
      button(toggle, "secondary", () => setStatus(w, toggle), toggle + " " + w.name),
      button("Rotate key", "secondary", () => rotate(w), "Rotate the key of " + w.name),
    );
    if (w.previousKeyExpiresAt) {
      actions.append(
        button("Revoke previous key", "danger", () => revokePrevious(w), "Revoke the previous key of " + w.name),
      );
    }
    actions.append(
      button("Delete", "danger", () => remove(w), "Delete " + w.name),
    );
    cell(tr, "Actions", actions);
    rows.append(tr);
  }
  $("table").hidden = state.webhooks.length === 0;
  $("empty").hidden = state.webhooks.length !== 0;
}

async function setStatus(w, verb) {
  const status = verb === "Disable" ? "disabled" : "enabled";
  const answer = await api("PATCH", webhooksPath(w.id), { status });
  if (answer.status !== 200) return say(messageOf(answer.data) || "Could not change the status.");
  await load();
  say(`${w.name} is ${status}.`);
  focusRow(w.id, status === "enabled" ? "Disable" : "Enable");
}

// The grace period as people say it: "24 hours", "90 minutes", "30 seconds".
function duration(seconds) {
  const [amount, unit] =
    seconds % 3600 === 0 ? [seconds / 3600, "hour"] : seconds % 60 === 0 ? [seconds / 60, "minute"] : [seconds, "second"];
  return `${amount} ${unit}${amount === 1 ? "" : "s"}`;
}

async function rotate(w) {
  const grace = state.rotationGraceSeconds;
  const keeps = grace > 0 ? `The old key keeps working for ${duration(grace)}.` : "The old key stops working at once.";
  if (!confirm(`Rotate the key of ${w.name}? ${keeps}`)) return;
  const answer = await api("POST", webhooksPath(w.id, "rotate-key"));
  if (answer.status !== 200) return say(messageOf(answer.data) || "Could not rotate the key.");
  await load();
  showKey(answer.data.name, answer.data.apiKey);
  say(`New key for ${w.name}; the previous key works until ${answer.data.previousKeyExpiresAt}.`);
}

async function revokePrevious(w) {
  if (!confirm(`Revoke the previous key of ${w.name} now? Deliveries stop being signed with it at once.`)) return;
  const answer = await api("POST", webhooksPath(w.id, "revoke-previous-key"));
  if (answer.status !== 200) return say(messageOf(answer.data) || "Could not revoke the previous key.");
  await load();
  say(`The previous key of ${w.name} no longer works; only the current key signs deliveries.`);
  focusRow(w.id, "Rotate key");
}

async function remove(w) {
  if (!confirm(`Delete ${w.name}? Deliveries to it stop, and this cannot be undone.`)) return;
  const answer = await api("DELETE", webhooksPath(w.id));
  if (answer.status !== 204) return say(messageOf(answer.data) || "Could not delete it.");
  await load();
  say(`${w.name} was deleted.`);
  $("create").focus();
}

function focusRow(id, text) {
  const row = document.querySelector(`tr[data-id="${CSS.escape(id)}"]`);
  const target = row && [...row.querySelectorAll("button")].find((b) => b.textContent === text);
  if (target) target.focus();
}

// --- the key, shown once ---

function showKey(name, key) {
  $("new-key-name").textContent = name;
  $("new-key-value").value = key;
  $("new-key").hidden = false;
  $("new-key").focus();
}

function hideKey() {
  $("new-key-value").value = "";
  $("new-key").hidden = true;
}

$("copy-key").addEventListener("click", async () => {
  const input = $("new-key-value");
  try {
    await navigator.clipboard.writeText(input.value);
    say("The key is copied to the clipboard.");
  } catch (e) {
    input.select();
    say("Copying is not allowed here: the key is selected, press Ctrl+C.");
  }
});

$("dismiss-key").addEventListener("click", () => {
  hideKey();
  say("The key is gone from this page.");
  $("create").focus();
});

// --- create and edit ---

const fieldNames = ["name", "url", "description", "status", "events"];

const inputOf = { name: "f-name", url: "f-url", description: "f-description" };

function clearErrors() {
  $("form-error").textContent = "";
  for (const f of fieldNames) $("e-" + f).textContent = "";
  for (const id of Object.values(inputOf)) $(id).removeAttribute("aria-invalid");
}

function openEditor(w) {
  state.editing = w || null;
  clearErrors();
  $("editor-title").textContent = w ? "Edit " + w.name : "Create webhook";
  $("save").textContent = w ? "Save" : "Create";
  $("f-name").value = w ? w.name : "";
  $("f-url").value = w ? w.url : "";
  $("f-description").value = w ? w.description : "";
  $(w && w.status === "disabled" ? "f-disabled" : "f-enabled").checked = true;
  const choices = $("event-choices");
  choices.replaceChildren();
  state.eventTypes.forEach((type, i) => {
    const label = document.createElement("label");
    label.className = "inline";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.name = "events";
    box.value = type;
    box.id = "f-event-" + i;
    box.checked = w ? w.events.includes(type) : i === 0;
    label.append(box, " " + type);
    choices.append(label);
  });
  $("editor").showModal();
  $("f-name").focus();
}

$("create").addEventListener("click", () => openEditor(null));
$("cancel").addEventListener("click", () => $("editor").close());

$("editor-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors();
  const body = {
    name: $("f-name").value,
    url: $("f-url").value.trim(),
    description: $("f-description").value,
    status: $("f-disabled").checked ? "disabled" : "enabled",
    events: [...document.querySelectorAll('#event-choices input:checked')].map((b) => b.value),
  };
  const editing = state.editing;
  const answer = editing
    ? await api("PATCH", webhooksPath(editing.id), body)
    : await api("POST", webhooksPath(), body);
  if (answer.status === 422) {
    let first = null;
    for (const e of answer.data.errors) {
      const field = fieldNames.find((f) => e.path === f || e.path.startsWith(f + "["));
      const slot = field ? $("e-" + field) : $("form-error");
      slot.textContent = (slot.textContent ? slot.textContent + " " : "") + e.message;
      if (inputOf[field]) $(inputOf[field]).setAttribute("aria-invalid", "true");
      if (!first) first = field;
    }
    const focus = { name: "f-name", url: "f-url", description: "f-description", status: "f-enabled" }[first];
    (focus ? $(focus) : $("event-choices").querySelector("input") || $("f-name")).focus();
    return;
  }
  if (answer.status !== 200 && answer.status !== 201) {
    $("form-error").textContent = messageOf(answer.data) || "The registry answered " + answer.status + ".";
    return;
  }
  $("editor").close();
  await load();
  if (editing) {
    say(`${answer.data.name} is saved.`);
    focusRow(answer.data.id, "Edit");
  } else {
    showKey(answer.data.name, answer.data.apiKey);
    say(`${answer.data.name} is created.`);
  }
});

// --- start: a token kept in this tab signs in again after a reload (the key does not come back) ---

(async () => {
  const token = sessionStorage.getItem("registry.token");
  if (!token) return showSignedIn(false);
  try {
    await signIn(token, sessionStorage.getItem("registry.organisation") || "");
  } catch (e) {
    /* signed out already */
  }
})();
