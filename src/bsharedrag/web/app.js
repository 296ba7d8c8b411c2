// The product-QA page and the admin view: plain JavaScript over the server's JSON API.
// Text from the server is always set with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "bsharedrag-api-key";

function headers(json = true) {
  const out = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
    return JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// --- asking ------------------------------------------------------------------------------

function showPassages(passages, cited) {
  const list = $("passages");
  list.replaceChildren();
  passages.forEach((passage, i) => {
    const item = document.createElement("li");
    item.id = `passage-${i + 1}`;
    item.dataset.docId = passage._id;
    if (cited.has(i + 1)) item.classList.add("cited");
    const title = document.createElement("strong");
    title.textContent = passage.title || passage._id;
    const text = document.createElement("div");
    text.textContent = passage.text;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = `${passage._id}${passage.product_id ? " · " + passage.product_id : ""} · score ${passage.score.toFixed(3)}`;
    item.append(title, text, meta);
    list.append(item);
  });
}

function showAnswer(text, count) {
  // Split on [n] markers so that each valid one links to its passage.
  const box = $("answer");
  box.replaceChildren();
  for (const piece of text.split(/(\[\d+\])/)) {
    const number = /^\[(\d+)\]$/.exec(piece);
    if (number && Number(number[1]) >= 1 && Number(number[1]) <= count) {
      const mark = document.createElement("span");
      mark.className = "cite";
      mark.textContent = piece;
      mark.onclick = () => $(`passage-${number[1]}`).scrollIntoView({ behavior: "smooth" });
      box.append(mark);
    } else {
      box.append(document.createTextNode(piece));
    }
  }
}

async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      yield { event, data: JSON.parse(data) };
    }
  }
}

async function ask(event) {
  event.preventDefault();
  const button = $("ask"), status = $("ask-status");
  const body = { question: $("question").value, stream: true };
  const product = $("product").value.trim();
  if (product) body.product_id = product;
  button.disabled = true;
  status.textContent = "Thinking…";
  status.classList.remove("error");
  $("answer").textContent = "";
  $("passages").replaceChildren();
  try {
    const response = await fetch("/v1/ask", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const { event: kind, data } of serverEvents(response)) {
      if (kind === "passages") {
        showPassages(data.passages, new Set());  // retrieval is done: show them while the answer is written
        status.textContent = data.passages.length ? "Writing the answer…" : "";
      } else if (kind === "token") $("answer").textContent += data.text;
      else if (kind === "answer") {
        showAnswer(data.answer, data.passages.length);
        showPassages(data.passages, new Set(data.citations.map((c) => c.number)));
        status.textContent = !data.passages.length ? "No passage matched, so no answer was written."
          : data.citations.length ? "" : "No passage was cited.";
      } else if (kind === "error") throw new Error(data.detail);
    }
  } catch (error) {
    status.textContent = error.message;
    status.classList.add("error");
  } finally {
    button.disabled = false;
  }
}

// --- admin -------------------------------------------------------------------------------

function adminStatus(message, ok = true) {
  const status = $("admin-status");
  status.textContent = message;
  status.className = ok ? "" : "error";
}

async function call(method, path, body) {
  const response = await fetch(path, { method, headers: headers(body !== undefined), body: body && JSON.stringify(body) });
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

async function addDocument(event) {
  event.preventDefault();
  const doc = { _id: $("doc-id").value.trim(), title: $("doc-title").value, text: $("doc-text").value };
  const product = $("doc-product").value.trim();
  if (product) doc.product_id = product;
  try {
    const result = await call("PUT", "/v1/documents", { documents: [doc] });
    adminStatus(`Saved ${result.ids.join(", ")}; ${result.documents} documents indexed.`);
    refreshHealth();
  } catch (error) {
    adminStatus(error.message, false);
  }
}

async function findDocument(event) {
  event.preventDefault();
  try {
    const doc = await call("GET", `/v1/documents/${encodeURIComponent($("find-id").value.trim())}`);
    $("doc-view").textContent = JSON.stringify(doc, null, 2);
    adminStatus("");
  } catch (error) {
    $("doc-view").textContent = "";
    adminStatus(error.message, false);
  }
}

async function removeDocument() {
  const id = $("find-id").value.trim();
  if (!id) return adminStatus("Enter the id of the document to remove.", false);
  try {
    const result = await call("DELETE", `/v1/documents/${encodeURIComponent(id)}`);
    $("doc-view").textContent = "";
    adminStatus(`Removed ${result.deleted}; ${result.documents} documents indexed.`);
    refreshHealth();
  } catch (error) {
    adminStatus(error.message, false);
  }
}

// --- page --------------------------------------------------------------------------------

async function refreshHealth() {
  try {
    const health = await (await fetch("/healthz")).json();
    $("health").textContent = `${health.documents} documents · adapters: ${health.adapters.join(", ")}`;
  } catch {
    $("health").textContent = "server unreachable";
  }
}

function showView(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === name);
  $("view-qa").hidden = name !== "qa";
  $("view-admin").hidden = name !== "admin";
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("input", () => sessionStorage.setItem(KEY_STORE, $("api-key").value));
  $("ask-form").addEventListener("submit", ask);
  $("add-form").addEventListener("submit", addDocument);
  $("find-form").addEventListener("submit", findDocument);
  $("remove").addEventListener("click", removeDocument);
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
  refreshHealth();
});
