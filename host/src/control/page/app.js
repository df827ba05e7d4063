// The dashboard: live events from /api/events, answers posted to /api/questions/{id}/answer. Text from the
// PEP (URLs, reasons: what a guest chose) only ever goes into textContent, never into HTML.
"use strict";

const MAX_ROWS = 500;
const rows = new Map(); // decision id -> table row
const questions = new Map(); // question id -> list item
const answered = new Set(); // question ids seen answered (the replayed recent events hold old questions)

const $ = (id) => document.getElementById(id);

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function time(ms) {
  return new Date(ms).toLocaleTimeString();
}

function matches(row) {
  const host = $("filter-host").value.trim().toLowerCase();
  const result = $("filter-result").value;
  const guest = $("filter-guest").value.trim().toLowerCase();
  return (!host || row.dataset.host.includes(host)) &&
    (!result || row.dataset.result === result) &&
    (!guest || row.dataset.guest.toLowerCase().includes(guest));
}

function applyFilters() {
  for (const row of $("decisions").tBodies[0].rows) row.hidden = !matches(row);
}

function onDecision(event) {
  const result = event.allow ? "allow" : event.ask ? "ask" : "deny";
  const row = document.createElement("tr");
  row.className = result;
  row.dataset.host = (event.request.host || "").toLowerCase();
  row.dataset.result = result;
  // The VM (the host's name for it) first: the guest's own name is only what it says of itself.
  const who = event.request.vm ? `vm ${event.request.vm} · ${event.request.guest}` : event.request.guest || "";
  row.dataset.guest = who;
  cell(row, time(event.ts_ms));
  cell(row, result === "ask" ? "asked" : result === "allow" ? "allowed" : "denied", "result");
  cell(row, event.request.method);
  cell(row, event.request.url, "url");
  cell(row, who);
  cell(row, (event.reasons || []).join("; "));
  cell(row, "…", "outcome");
  row.hidden = !matches(row);
  const body = $("decisions").tBodies[0];
  body.insertBefore(row, body.firstChild);
  rows.set(event.decision_id, row);
  while (body.rows.length > MAX_ROWS) {
    const last = body.rows[body.rows.length - 1];
    for (const [id, r] of rows) if (r === last) rows.delete(id);
    last.remove();
  }
}

let hostsDue = null;
function refreshHostsSoon() {
  if (hostsDue === null) hostsDue = setTimeout(() => { hostsDue = null; loadHosts(); }, 300);
}

function onOutcome(event) {
  const row = rows.get(event.decision_id);
  if (!row) return;
  const text = event.status ? `${event.status}${event.bytes != null ? `, ${event.bytes} B` : ""}` : event.error || "ended";
  row.querySelector("td.outcome").textContent = text;
}

function answerButton(question, label, answer, className, prefixInput) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = label;
  button.className = className;
  button.dataset.answer = answer;
  button.addEventListener("click", async () => {
    const body = { answer };
    if (prefixInput && prefixInput.dataset.use === "yes") body.path_prefix = prefixInput.value.trim();
    for (const b of button.parentElement.querySelectorAll("button")) b.disabled = true;
    const response = await fetch(`/api/questions/${encodeURIComponent(question.id)}/answer`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      alert(`Not answered: ${error.error ? error.error.message : response.status}`);
      for (const b of button.parentElement.querySelectorAll("button")) b.disabled = false;
    }
  });
  return button;
}

function defaultPrefix(path) {
  const cut = path.lastIndexOf("/");
  return cut > 0 ? path.slice(0, cut + 1) : "/";
}

function showQuestion(question) {
  if (answered.has(question.id)) return;
  if (questions.has(question.id)) {
    questions.get(question.id).querySelector(".waiting").textContent = `${question.waiting} request(s) waiting`;
    return;
  }
  const item = document.createElement("li");
  item.dataset.id = question.id;
  const what = document.createElement("div");
  what.className = "what";
  what.textContent = `${question.method} ${question.url}`;
  const meta = document.createElement("div");
  meta.className = "meta";
  const waiting = document.createElement("span");
  waiting.className = "waiting";
  waiting.textContent = `${question.waiting} request(s) waiting`;
  meta.textContent = `${question.vm ? `vm ${question.vm} · ` : ""}guest ${question.guest} · ${question.reasons.join("; ")} · asked ${time(question.asked_ms)} · denied unanswered at ${time(question.deadline_ms)} · `;
  meta.appendChild(waiting);
  const prefix = document.createElement("input");
  prefix.className = "prefix";
  prefix.value = defaultPrefix(question.path);
  prefix.title = "with a path prefix, an always answer covers this method under it only";
  const usePrefix = document.createElement("label");
  const check = document.createElement("input");
  check.type = "checkbox";
  check.checked = question.scope === "path";
  check.disabled = question.scope === "path";
  prefix.dataset.use = check.checked ? "yes" : "no";
  check.addEventListener("change", () => { prefix.dataset.use = check.checked ? "yes" : "no"; });
  usePrefix.append(check, " always answers only for ", question.method, " under ", prefix);
  const buttons = document.createElement("div");
  buttons.append(
    answerButton(question, "Allow once", "allow_once", "allow"),
    answerButton(question, "Allow always", "allow_always", "allow", prefix),
    answerButton(question, "Deny once", "deny_once", "deny"),
    answerButton(question, "Deny always", "deny_always", "deny", prefix),
  );
  item.append(what, meta, buttons, usePrefix);
  $("questions").appendChild(item);
  questions.set(question.id, item);
  updateQuestionCount();
}

function onAnswer(event) {
  answered.add(event.question_id);
  const item = questions.get(event.question_id);
  if (item) {
    item.remove();
    questions.delete(event.question_id);
    updateQuestionCount();
  }
  if (event.answer.endsWith("_always")) {
    // The entry is in force: a new policy revision and one more entry.
    loadEntries();
    loadStatus();
  }
}

function updateQuestionCount() {
  $("question-count").textContent = String(questions.size);
  $("no-questions").hidden = questions.size > 0;
}

async function getJson(path) {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

async function loadQuestions() {
  const { questions: waiting } = await getJson("/api/questions");
  const open = new Set(waiting.map((q) => q.id));
  for (const [id, item] of questions) if (!open.has(id)) { item.remove(); questions.delete(id); }
  waiting.forEach(showQuestion);
  updateQuestionCount();
}

async function loadEntries() {
  const { entries } = await getJson("/api/entries");
  const body = $("entries").tBodies[0];
  body.replaceChildren();
  for (const listed of entries) {
    const row = document.createElement("tr");
    row.className = listed.list;
    cell(row, listed.list);
    cell(row, JSON.stringify(listed.entry), "url");
    cell(row, listed.source);
    body.appendChild(row);
  }
}

async function loadHosts() {
  const { hosts } = await getJson("/api/hosts");
  const body = $("hosts").tBodies[0];
  body.replaceChildren();
  for (const [host, counts] of Object.entries(hosts)) {
    const row = document.createElement("tr");
    cell(row, host, "url");
    cell(row, String(counts.allowed));
    cell(row, String(counts.denied));
    cell(row, String(counts.asked));
    body.appendChild(row);
  }
}

async function verifyAudit() {
  const badge = $("audit");
  badge.textContent = "audit: checking…";
  const report = await getJson("/api/audit");
  badge.className = report.ok ? "badge ok" : "badge broken";
  badge.textContent = report.ok
    ? `audit chain verified: ${report.records} records, ${report.signed} signed`
    : `audit chain BROKEN: ${report.problem}`;
}

async function loadStatus() {
  const status = await getJson("/api/status");
  $("status").textContent = `policy ${status.policy_revision.slice(0, 19)} · approvals ${status.approvals.enabled ? "on" : "off"}`;
}

function connect() {
  const source = new EventSource("/api/events");
  source.addEventListener("decision", (e) => { onDecision(JSON.parse(e.data)); refreshHostsSoon(); });
  source.addEventListener("outcome", (e) => onOutcome(JSON.parse(e.data)));
  source.addEventListener("question", (e) => { const q = JSON.parse(e.data).question; if (q) showQuestion(q); });
  source.addEventListener("answer", (e) => onAnswer(JSON.parse(e.data)));
  source.addEventListener("lagged", () => { loadQuestions(); });
  source.onopen = () => { document.body.dataset.live = "yes"; loadQuestions(); };
}

for (const id of ["filter-host", "filter-result", "filter-guest"]) $(id).addEventListener("input", applyFilters);
$("verify").addEventListener("click", verifyAudit);
loadStatus();
loadEntries();
loadHosts();
setInterval(loadHosts, 5000);
verifyAudit();
connect();
