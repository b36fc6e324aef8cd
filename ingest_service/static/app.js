// The labvault dashboard: plain JavaScript, no build step. It asks its own server
// (the ingest service) where the services are, then calls the ingest service (same
// origin) and the stats service (cross-origin; the stats service allows this origin).
"use strict";

const state = { config: null, timer: null, view: "jobs" };
const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  return node;
}

function apiToken() { return sessionStorage.getItem("labvault-token") || ""; }
function downloadToken() { return sessionStorage.getItem("labvault-download-token") || ""; }

async function call(base, path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.config && state.config.auth_mode === "token" && apiToken()) headers["Authorization"] = "Bearer " + apiToken();
  const response = await fetch(base + path, Object.assign({}, options, { headers }));
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const error = new Error((body && body.message) || response.statusText);
    error.status = response.status;
    error.code = body && body.code;
    throw error;
  }
  return body;
}
const ingest = (path, options) => call(state.config.ingest, path, options);
const stats = (path, options) => call(state.config.stats, path, options);

function showError(error) {
  const box = $("#error");
  if (!error) { box.hidden = true; return; }
  box.textContent = error.code ? `${error.code}: ${error.message}` : String(error.message || error);
  box.hidden = false;
  if (error.status === 401 && state.config.auth_mode === "token") $("#login").hidden = false;
}

function age(created) {
  const then = Date.parse(created.replace(" ", "T") + "Z");
  const seconds = Math.max(0, Math.round((Date.now() - then) / 1000));
  if (seconds < 90) return `${seconds}s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)}m`;
  if (seconds < 129600) return `${Math.round(seconds / 3600)}h`;
  return `${Math.round(seconds / 86400)}d`;
}

function bar(job) {
  const kind = job.state === "FAILED" ? "failed" : job.complete ? "done" : "";
  return el("span", { class: `bar ${kind}`, title: `${job.task_percent}%` },
            el("span", { style: `width: ${Math.min(100, parseFloat(job.task_percent) || 0)}%` }));
}

// -- jobs ------------------------------------------------------------------------
async function loadJobs() {
  const params = new URLSearchParams({ limit: "100" });
  const filterState = $("#filter-state").value, submitter = $("#filter-submitter").value.trim();
  const project = $("#filter-project").value.trim();
  if (filterState) params.set("state", filterState);
  if (submitter) params.set("submitter", submitter);
  if (project) params.set("project", project);
  const page = await ingest("/jobs?" + params);
  const rows = page.jobs.map((job) => el("tr", { class: "job", id: `job-${job.job_id}`, "data-state": job.state,
                                                 "data-complete": String(job.complete),
                                                 onclick: () => { location.hash = `#job/${job.job_id}`; } },
    el("td", {}, String(job.job_id)),
    el("td", { class: `state state-${job.state}` }, job.state),
    el("td", { class: "task" }, job.task),
    el("td", {}, bar(job), ` ${job.task_percent}%`),
    el("td", {}, age(job.created)),
    el("td", {}, job.submitter == null ? "" : String(job.submitter)),
    el("td", {}, job.project == null ? "" : String(job.project)),
    el("td", { class: "exception" }, job.exception)));
  $("#jobs tbody").replaceChildren(...rows);
  $("#jobs-total").textContent = `${page.total} job(s)`;
  rememberProjects(page.jobs.map((job) => job.project).filter((p) => p != null));
}

async function loadJob(jobId) {
  const job = await ingest(`/jobs/${encodeURIComponent(jobId)}`);
  $("#job-title").textContent = `Job ${job.job_id}`;
  const facts = [["State", job.state], ["Step", job.task], ["Progress", `${job.task_percent}%`],
                 ["Complete", String(job.complete)], ["Created", job.created], ["Updated", job.updated],
                 ["Submitter", job.submitter ?? ""], ["Project", job.project ?? ""],
                 ["Failed at", job.state === "FAILED" ? job.task : ""], ["Why", job.exception]];
  $("#job-state").replaceChildren(...facts.flatMap(([name, value]) => [
    el("dt", {}, name), el("dd", { class: name === "Why" ? "exception" : "" }, String(value))]));
  $("#job-files tbody").replaceChildren(...job.files.map((file) => el("tr", {},
    el("td", {}, String(file._id)), el("td", { class: "mono" }, [file.subdir, file.name].filter(Boolean).join("/")),
    el("td", {}, String(file.size)), el("td", { class: "mono" }, `${file.hashtype}:${file.hashsum}`),
    el("td", {}, file.mimetype || ""))));
}

// -- projects and computed files ---------------------------------------------------
function rememberProjects(projects) {
  const known = new Set(JSON.parse(sessionStorage.getItem("labvault-projects") || "[]"));
  projects.forEach((p) => known.add(String(p)));
  sessionStorage.setItem("labvault-projects", JSON.stringify([...known]));
  $("#known-projects").replaceChildren(...[...known].sort().map((p) => el("option", { value: p })));
}

async function loadProject(project) {
  if (!project) return;
  const summary = await stats(`/stats/${encodeURIComponent(project)}`);
  const numbers = Object.entries(summary).filter(([, v]) => v === null || typeof v !== "object");
  $("#project-stats").replaceChildren(el("h2", {}, `Project ${project}`),
    el("dl", { id: "project-numbers" }, ...numbers.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))])));
  const figures = await stats(`/stats/${encodeURIComponent(project)}/figures`);
  const list = Array.isArray(figures) ? figures : (figures.figures || []);
  $("#project-figures").replaceChildren(...list.map((figure) => {
    const name = figure.name || figure;
    return el("figure", {}, el("img", { alt: name, src: `${state.config.stats}/stats/${encodeURIComponent(project)}/figures/${encodeURIComponent(name)}` }),
              el("figcaption", {}, name));
  }));
}

// Download links already handed out, by computed file id: a refresh of the table keeps them.
const downloadLinks = new Map();

function downloadCell(file) {
  const link = downloadLinks.get(file.id);
  if (link) return el("a", { href: link.download_url, class: "download-link" }, `Download ${link.filename}`);
  return el("button", { class: "download", onclick: () => download(file.id) }, "Download");
}

async function loadComputedFiles() {
  const project = $("#files-project").value.trim();
  const rows = await stats("/computed_files" + (project ? `?project=${encodeURIComponent(project)}` : ""));
  $("#computed-files tbody").replaceChildren(...rows.map((file) => el("tr", { id: `computed-${file.id}` },
    el("td", {}, String(file.id)), el("td", {}, String(file.project)), el("td", {}, file.kind),
    el("td", { class: "mono" }, file.filename), el("td", {}, file.size == null ? "" : String(file.size)),
    el("td", {}, file.skipped ? el("span", { class: "muted" }, file.skipped.message)
                              : downloadCell(file)))));
}

async function download(id) {
  if (!downloadToken()) {
    $("#download-token").hidden = false;
    $("#download-token").dataset.pending = String(id);
    return;
  }
  try {
    const file = await stats(`/computed_files/${id}`, { headers: { "API-KEY": downloadToken() } });
    // A link the user follows (a signed URL, valid for a while): the file is an attachment.
    downloadLinks.set(Number(id), file);
    // The table may have been redrawn while the URL was asked for: find the row again, if it is there.
    const cell = $(`#computed-${id} td:last-child`);
    if (cell) cell.replaceChildren(downloadCell({ id: Number(id) }));
  } catch (error) { showError(error); }
}

async function createDownloadToken(event) {
  event.preventDefault();
  const made = await stats("/tokens", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ email: $("#download-email").value, is_activated: $("#download-terms").checked }) });
  sessionStorage.setItem("labvault-download-token", made.id);
  $("#download-token").hidden = true;
  const pending = $("#download-token").dataset.pending;
  if (pending) await download(pending);
}

// -- archive and API --------------------------------------------------------------
async function loadFixity() {
  try {
    const summary = await ingest("/dashboard/api/fixity");
    $("#fixity").replaceChildren(el("dl", {}, ...Object.entries(summary).flatMap(([k, v]) => [
      el("dt", {}, k), el("dd", {}, typeof v === "object" ? JSON.stringify(v) : String(v))])));
  } catch (error) {
    if (error.status !== 404) throw error;
    $("#fixity").replaceChildren(el("p", { class: "muted", id: "fixity-missing" }, "Fixity summary: not available."));
  }
}

function loadApi() {
  $("#api-list").replaceChildren(...state.config.services.map((name) => el("li", {},
    el("a", { href: `api.html?service=${encodeURIComponent(name)}` }, name),
    " (", el("a", { href: `api/openapi/${encodeURIComponent(name)}` }, "JSON"), ")")));
}

// -- views ----------------------------------------------------------------------
async function show() {
  const [view, arg] = (location.hash.slice(1) || "jobs").split("/");
  state.view = view;
  clearInterval(state.timer);
  document.querySelectorAll(".view").forEach((section) => { section.hidden = section.id !== `view-${view}`; });
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.id === `nav-${view}`));
  const loaders = { jobs: loadJobs, job: () => loadJob(arg), projects: () => loadProject($("#project-id").value.trim()),
                    files: loadComputedFiles, fixity: loadFixity, api: loadApi };
  const load = loaders[view] || loadJobs;
  const refresh = async () => { try { await load(); showError(null); } catch (error) { showError(error); } };
  await refresh();
  if (view === "jobs" || view === "job") state.timer = setInterval(refresh, 1000);  // live, no reload
}

async function start() {
  state.config = await (await fetch("config.json")).json();
  if (state.config.auth_mode === "token") {
    $("#login").hidden = Boolean(apiToken());
    $("#who").textContent = apiToken() ? "signed in with a token" : "token mode: sign in";
  }
  $("#login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("labvault-token", $("#token").value.trim());
    $("#login").hidden = true;
    $("#who").textContent = "signed in with a token";
    show();
  });
  $("#job-filters").addEventListener("change", () => loadJobs().catch(showError));
  $("#job-filters").addEventListener("submit", (event) => { event.preventDefault(); loadJobs().catch(showError); });
  $("#project-form").addEventListener("submit", (event) => { event.preventDefault(); loadProject($("#project-id").value.trim()).catch(showError); });
  $("#files-form").addEventListener("submit", (event) => { event.preventDefault(); loadComputedFiles().catch(showError); });
  $("#download-token").addEventListener("submit", (event) => createDownloadToken(event).catch(showError));
  rememberProjects([]);
  window.addEventListener("hashchange", show);
  await show();
}

start();
