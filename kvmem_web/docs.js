// The API page: /openapi.json rendered as text (textContent only), no build step.
"use strict";

const $ = (id) => document.getElementById(id);

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function schemaText(schema) {
  return JSON.stringify(schema, null, 2);
}

function renderOperation(path, method, op) {
  const section = element("section", undefined, "operation");
  section.append(element("h2", `${method.toUpperCase()} ${path}`));
  if (op.summary) section.append(element("p", op.summary));
  if (op.description && op.description !== op.summary) section.append(element("p", op.description));
  const params = op.parameters || [];
  if (params.length) {
    const table = element("table");
    const head = table.createTHead().insertRow();
    for (const name of ["Parameter", "In", "Required", "Schema", "Description"]) {
      head.append(element("th", name));
    }
    const body = table.createTBody();
    for (const p of params) {
      const row = body.insertRow();
      row.insertCell().textContent = p.name;
      row.insertCell().textContent = p.in;
      row.insertCell().textContent = p.required ? "yes" : "no";
      row.insertCell().textContent = p.schema ? JSON.stringify(p.schema) : "";
      row.insertCell().textContent = p.description || "";
    }
    section.append(table);
  }
  const content = op.requestBody && op.requestBody.content;
  if (content) {
    for (const [type, media] of Object.entries(content)) {
      section.append(element("h3", `Request body (${type})`));
      section.append(element("pre", schemaText(media.schema || {})));
    }
  }
  const responses = element("ul");
  for (const [code, response] of Object.entries(op.responses || {})) {
    responses.append(element("li", `${code}: ${response.description || ""}`));
  }
  section.append(element("h3", "Responses"), responses);
  return section;
}

async function load() {
  const headers = {};
  const token = sessionStorage.getItem("kvmem-token");
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch("/openapi.json", { headers });
  if (response.status === 401) {
    $("status").textContent = "This server asks for a token.";
    $("token-form").hidden = false;
    return;
  }
  const spec = await response.json();
  const root = $("api");
  root.replaceChildren(element("p", `${spec.info.title} ${spec.info.version}`));
  if (spec.info.description) root.append(element("p", spec.info.description));
  for (const [path, item] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(item)) {
      if (["get", "put", "post", "delete", "head", "options", "patch"].includes(method)) {
        root.append(renderOperation(path, method, op));
      }
    }
  }
  const schemas = (spec.components && spec.components.schemas) || {};
  for (const [name, schema] of Object.entries(schemas)) {
    root.append(element("h2", `Schema ${name}`), element("pre", schemaText(schema)));
  }
  $("status").textContent = "";
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("kvmem-token", $("t-token").value);
    $("token-form").hidden = true;
    load();
  });
  load();
});
