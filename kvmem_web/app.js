// kvmem's memory browser: plain JavaScript over the documented /v1 API, no build step.
// Every text from the server is put in the page with textContent, never as HTML.
"use strict";

const PAGE = 50;
const $ = (id) => document.getElementById(id);
const state = { namespace: "default", cursors: [null], page: 0, current: null, forget: null };

class ApiError extends Error {
  constructor(status, data) {
    super(data && data.error ? data.error.message : `HTTP ${status}`);
    this.status = status;
    this.data = data;
  }
}

function token() { return sessionStorage.getItem("kvmem-token") || ""; }

async function api(method, path, params = [], body = undefined) {
  const url = new URL(path, location.origin);
  for (const [name, value] of params) url.searchParams.append(name, value);
  const headers = {};
  if (token()) headers.Authorization = `Bearer ${token()}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(url, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await response.json(); } catch { data = null; }
  if (response.status === 401) {
    show("token");
    throw new ApiError(401, data);
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

function say(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

function failed(error) {
  say(error instanceof ApiError ? `${error.status}: ${error.message}` : String(error), true);
}

function show(id) {
  for (const panel of ["detail", "new", "forget", "token"]) $(panel).hidden = panel !== id;
  if (id === "token") {
    $("t-token").value = "";
    $("t-token").focus();
  }
}

const memoryPath = (key) => `/v1/memories/${encodeURIComponent(key)}`;
const ns = () => [["namespace", state.namespace]];
const tagList = (text) => text.split(",").map((t) => t.trim()).filter((t) => t);

function when(iso) {
  if (!iso) return "—";
  return `${new Date(iso).toLocaleString()} (${iso})`;
}

function remaining(iso) {
  if (!iso) return "none";
  const seconds = (Date.parse(iso) - Date.now()) / 1000;
  if (seconds <= 0) return "expired";
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  return `${h} h ${m} min left (until ${iso})`;
}

// ------------------------------------------------------------------ namespaces ---

async function loadNamespaces() {
  const data = await api("GET", "/v1/namespaces");
  const select = $("namespace");
  const names = data.items.map((item) => item.namespace);
  select.replaceChildren();
  const items = names.includes(state.namespace) ? data.items
    : [{ namespace: state.namespace, live: 0, archived: 0 }, ...data.items];
  for (const item of items) {
    const option = document.createElement("option");
    option.value = item.namespace;
    option.textContent = `${item.namespace} (${item.live} live, ${item.archived} archived)`;
    select.append(option);
  }
  select.value = state.namespace;
}

// ---------------------------------------------------------------- list, search ---

function filterParams() {
  const params = [...ns()];
  if ($("prefix").value) params.push(["prefix", $("prefix").value]);
  if ($("tag").value.trim()) params.push(["tag", $("tag").value.trim()]);
  return params;
}

async function loadList() {
  const query = $("search").value.trim();
  let data;
  if (query) {
    data = await api("GET", "/v1/search", [["q", query], ...filterParams(), ["limit", PAGE]]);
  } else {
    const params = [...filterParams(), ["archived", $("archived").checked ? "true" : "false"],
      ["limit", PAGE]];
    const cursor = state.cursors[state.page];
    if (cursor) params.push(["cursor", cursor]);
    data = await api("GET", "/v1/memories", params);
    state.cursors[state.page + 1] = data.next_cursor;
  }
  renderRows(data.items, Boolean(query));
  $("more").hidden = Boolean(query) || !data.next_cursor;
  $("prev").hidden = Boolean(query) || state.page === 0;
  $("count").textContent = query
    ? `${data.items.length} found`
    : `page ${state.page + 1}: ${data.items.length} memories`;
}

function renderRows(items, scored) {
  $("score-head").hidden = !scored;
  const body = $("list").tBodies[0];
  body.replaceChildren();
  for (const memory of items) {
    const row = body.insertRow();
    row.tabIndex = 0;
    row.dataset.key = memory.key;
    row.insertCell().textContent = memory.key;
    row.insertCell().textContent = memory.tags.join(", ");
    row.insertCell().textContent = new Date(memory.updated_at).toLocaleString();
    const meter = document.createElement("meter");
    Object.assign(meter, { min: 0, max: 1, low: 0.2, optimum: 1,
      value: memory.current_strength });
    row.insertCell().append(meter);
    if (scored) row.insertCell().textContent = memory.score.toFixed(3);
    const open = () => openFresh(memory);
    row.addEventListener("click", open);
    row.addEventListener("keydown", (event) => { if (event.key === "Enter") open(); });
  }
}

async function refresh(resetPages = true) {
  if (resetPages) { state.cursors = [null]; state.page = 0; }
  try {
    await loadNamespaces();
    await loadList();
  } catch (error) { failed(error); }
}

// ---------------------------------------------------------------------- detail ---

// A row's memory as it is now (another client may have changed it since the list was
// read); an archived one as listed, since GET reads live memories only.
async function openFresh(memory) {
  if (memory.archived) return openMemory(memory);
  try {
    openMemory(await api("GET", memoryPath(memory.key), ns()));
  } catch (error) { failed(error); }
}

function openMemory(memory) {
  state.current = memory;
  $("d-key").textContent = memory.key;
  $("d-namespace").textContent = memory.namespace;
  $("d-version").textContent = String(memory.version);
  $("d-created").textContent = when(memory.created_at);
  $("d-updated").textContent = when(memory.updated_at);
  $("d-ttl").textContent = remaining(memory.expires_at);
  $("d-strength").value = memory.current_strength;
  $("d-strength-text").textContent = memory.current_strength.toFixed(3);
  $("d-state").textContent = memory.archived ? "archived" : "live";
  $("d-value").value = JSON.stringify(memory.value, null, 2);
  $("d-tags").value = memory.tags.join(", ");
  $("restore").hidden = !memory.archived;
  $("reinforce").hidden = memory.archived;
  show("detail");
  for (const row of $("list").tBodies[0].rows) {
    row.classList.toggle("selected", row.dataset.key === memory.key);
  }
}

async function save() {
  const memory = state.current;
  const valueText = JSON.stringify(memory.value, null, 2);
  const tagsText = memory.tags.join(", ");
  if ($("d-value").value === valueText && $("d-tags").value === tagsText) {
    say(`Nothing to save: ${memory.key} is as shown`);
    return;
  }
  let value = memory.value;
  if ($("d-value").value !== valueText) {
    try { value = JSON.parse($("d-value").value); } catch (error) {
      say(`The value is not JSON: ${error.message}`, true);
      return;
    }
  }
  // Tags whose text was not touched are sent as they are (a tag may hold a comma).
  const tags = $("d-tags").value === tagsText ? memory.tags : tagList($("d-tags").value);
  const body = { value, tags, if_version: memory.version,
    half_life_seconds: memory.half_life_seconds };
  if (memory.expires_at) {  // a PUT replaces the whole memory: keep the time it has left
    body.ttl_seconds = Math.max(1, (Date.parse(memory.expires_at) - Date.now()) / 1000);
  }
  try {
    const saved = await api("PUT", memoryPath(memory.key), ns(), body);
    openMemory(saved);
    say(`Saved ${saved.key}: version ${saved.version}`);
    await refresh(false);
  } catch (error) {
    if (error instanceof ApiError && error.status === 409) {
      const now = error.data.error.current_version;
      say(`Not saved: ${memory.key} was changed elsewhere and is now at version ${now}` +
          ` (you edited version ${memory.version}). Your text is still here; reopen the` +
          " memory to see the current one.", true);
    } else failed(error);
  }
}

async function reinforce() {
  const memory = state.current;
  try {
    const done = await api("POST", `${memoryPath(memory.key)}/reinforce`, ns());
    openMemory(done);
    say(`${memory.archived ? "Restored" : "Reinforced"} ${done.key}`);
    await refresh(false);
  } catch (error) { failed(error); }
}

async function remove() {
  const memory = state.current;
  if (!confirm(`Delete ${memory.key} from ${memory.namespace}?`)) return;
  try {
    await api("DELETE", memoryPath(memory.key), [...ns(), ["if_version", memory.version]]);
    $("detail").hidden = true;
    say(`Deleted ${memory.key}`);
    await refresh(false);
  } catch (error) { failed(error); }
}

async function create(event) {
  event.preventDefault();
  let value;
  try { value = JSON.parse($("n-value").value); } catch (error) {
    say(`The value is not JSON: ${error.message}`, true);
    return;
  }
  const body = { value, tags: tagList($("n-tags").value) };
  if ($("n-ttl").value.trim()) {
    body.ttl_seconds = Number($("n-ttl").value);
    if (!Number.isFinite(body.ttl_seconds) || body.ttl_seconds <= 0) {
      say("The TTL must be a number of seconds, such as 3600", true);
      return;
    }
  }
  body.if_version = 0;  // create only: never replace a memory that exists
  try {
    const made = await api("PUT", memoryPath($("n-key").value), ns(), body);
    say(`Created ${made.key}`);
    openMemory(made);
    await refresh();
  } catch (error) { failed(error); }
}

// ---------------------------------------------------------------------- forget ---

function forgetParams() {
  const params = [...ns()];
  if ($("f-prefix").value) params.push(["prefix", $("f-prefix").value]);
  if ($("f-tag").value.trim()) params.push(["tag", $("f-tag").value.trim()]);
  return params;
}

async function dryRun(event) {
  event.preventDefault();
  try {
    const params = forgetParams();
    const report = await api("DELETE", "/v1/memories", [...params, ["dry_run", "true"]]);
    state.forget = params;
    $("f-summary").textContent = `${report.matched} memories in ${state.namespace} would be ` +
      `forgotten${report.more ? ` (the first ${report.keys.length} are listed)` : ""}. ` +
      "The button deletes what matches when you click it.";
    $("f-keys").replaceChildren(...report.keys.map((key) => {
      const item = document.createElement("li");
      item.textContent = key;
      return item;
    }));
    $("forget-now").hidden = report.matched === 0;
    $("f-result").hidden = false;
  } catch (error) { failed(error); }
}

async function forgetNow() {
  if (!state.forget || !confirm("Forget these memories? This cannot be undone.")) return;
  try {
    const report = await api("DELETE", "/v1/memories", [...state.forget, ["dry_run", "false"]]);
    $("f-result").hidden = true;
    state.forget = null;
    say(`Forgot ${report.deleted} memories`);
    await refresh();
  } catch (error) { failed(error); }
}

// ----------------------------------------------------------------------- start ---

function start() {
  $("namespace").addEventListener("change", () => {
    state.namespace = $("namespace").value;
    $("detail").hidden = true;
    refresh();
  });
  $("filters").addEventListener("submit", (event) => { event.preventDefault(); refresh(); });
  $("more").addEventListener("click", () => { state.page += 1; refresh(false); });
  $("prev").addEventListener("click", () => { state.page -= 1; refresh(false); });
  $("save").addEventListener("click", save);
  $("reinforce").addEventListener("click", reinforce);
  $("restore").addEventListener("click", reinforce);
  $("delete").addEventListener("click", remove);
  $("close").addEventListener("click", () => { $("detail").hidden = true; });
  $("show-new").addEventListener("click", () => { show("new"); $("n-key").focus(); });
  $("new-form").addEventListener("submit", create);
  $("new-close").addEventListener("click", () => { $("new").hidden = true; });
  $("show-forget").addEventListener("click", () => { show("forget"); $("f-prefix").focus(); });
  $("forget-form").addEventListener("submit", dryRun);
  $("forget-now").addEventListener("click", forgetNow);
  $("forget-close").addEventListener("click", () => { $("forget").hidden = true; });
  $("show-token").addEventListener("click", () => show("token"));
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("kvmem-token", $("t-token").value);
    $("token").hidden = true;
    say("");
    refresh();
  });
  $("token-close").addEventListener("click", () => { $("token").hidden = true; });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") for (const id of ["detail", "new", "forget", "token"]) $(id).hidden = true;
  });
  refresh();
}

document.addEventListener("DOMContentLoaded", start);
