// The local console: polls /_console/sessions and redraws only the sessions that changed.
"use strict";

const POLL_MS = 1000;
const token = document.querySelector('meta[name="console-token"]').content;
const PROGRESS = {
  QUEUED: 5, EXTRACTING: 20, WAITING_FOR_SLOT: 40, GENERATING: 60, ATTACHING: 85,
  SUCCEEDED: 100, FAILED: 100, CANCELLED: 100,
};
const drawn = new Map(); // session id -> the JSON it was last drawn from

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (name === "className") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function seconds(ms) { return `${(ms / 1000).toFixed(1)} s`; }

function thumbnail(run) {
  const images = (run.images || []).filter((image) => image.hubUrl);
  if (images.length) {
    // every candidate of the request, in the order they were attached
    return el("div", { className: images.length > 1 ? "thumbs" : "" }, images.map((image, index) =>
      el("a", { href: image.hubUrl, target: "_blank", className: "thumb-box" },
        el("img", { className: "thumb", src: image.hubUrl,
                    alt: `${run.prompt ? run.prompt.text : "generated image"} (${index + 1} of ${images.length})` }))));
  }
  const image = run.image;
  const why = run.status === "FAILED" ? "no image" : image ? "uploading to the hub…" : "no image yet";
  return el("div", { className: "thumb-box" }, why);
}

function drawRun(run) {
  const finished = run.timeline.length ? run.timeline[run.timeline.length - 1].atMs : run.updatedAtMs;
  const elapsed = ["SUCCEEDED", "FAILED", "CANCELLED"].includes(run.status)
    ? finished - run.createdAtMs : Date.now() - run.createdAtMs;
  const queue = run.queue
    ? ` · position ${run.queue.position} in the queue, about ${Math.max(0, Math.ceil((run.queue.startAtMs - Date.now()) / 1000))} s`
    : "";
  const model = run.model ? run.model.actual + (run.model.substituted ? ` (asked: ${run.model.requested})` : "") : "";
  const output = run.output || {};
  const options = [
    output.imagesPerTask > 1 ? `${output.imagesPerTask} images` : null,
    output.format && output.format !== "png" ? output.format + (output.compression != null ? ` ${output.compression}` : "") : null,
    output.background ? `background ${output.background}` : null,
    run.maxCostUsd != null ? `limit $${run.maxCostUsd}` : null,
    run.estimatedCostUsd ? `about $${run.estimatedCostUsd}` : null,
  ].filter(Boolean).map((text) => ` · ${text}`).join("");
  return el("div", { className: "run", "data-task": run.taskId, "data-status": run.status },
    thumbnail(run),
    el("div", {},
      el("div", { className: "run-head" },
        el("span", { className: "task" }, run.taskId),
        el("span", { className: `badge ${run.status}` }, run.status),
        el("span", { className: "meta" }, `${model} · ${run.size} · ${run.promptSource}${options} · ${seconds(Math.max(0, elapsed))}${queue}`)),
      el("div", { className: `progress ${run.status}` },
        el("div", { style: `width: ${PROGRESS[run.status] ?? 50}%` })),
      run.prompt && run.prompt.template
        ? el("div", { className: "meta" }, `template: ${run.prompt.template}`) : null,
      run.prompt
        ? el("blockquote", { className: "prompt" }, run.prompt.text)
        : el("div", { className: "meta" }, "prompt not extracted yet"),
      run.notes && run.notes.length ? el("div", { className: "notes" }, run.notes.join(" · ")) : null,
      run.failure ? el("div", { className: "failure" }, `${run.failure.reason}: ${run.failure.message}`) : null));
}

function drawSession(view) {
  const counts = Object.entries(view.counts).map(([status, n]) => `${n} ${status.toLowerCase()}`).join(", ");
  return el("article", { className: "session", "data-session": view.session, "data-status": view.status },
    el("div", { className: "session-head" },
      el("span", { className: "session-id" }, view.session),
      el("span", { className: `badge ${view.status}` }, view.status),
      el("span", { className: "counts" }, `${view.progress.total} run${view.progress.total === 1 ? "" : "s"}: ${counts}`
        + (view.next ? ` (the first ${view.runs.length} shown)` : ""))),
    view.runs.map(drawRun),
    view.logs.length
      ? el("ol", { className: "logs" }, view.logs.map(
          (line) => el("li", { className: line.level || "INFO" }, line.taskId ? `[${line.taskId}] ${line.msg}` : line.msg)))
      : null);
}

async function refresh() {
  try {
    const answer = await fetch("/_console/sessions", { cache: "no-store" });
    const { sessions } = await answer.json();
    const list = document.getElementById("sessions");
    const running = sessions.filter((s) => !["SUCCEEDED", "FAILED", "CANCELLED"].includes(s.status)).length;
    document.getElementById("summary").textContent =
      `${sessions.length} session${sessions.length === 1 ? "" : "s"}, ${running} running · refreshed ${new Date().toLocaleTimeString()}`;
    const seen = new Set();
    let previous = null;
    for (const view of sessions) {
      seen.add(view.session);
      const json = JSON.stringify(view);
      let node = list.querySelector(`[data-session="${CSS.escape(view.session)}"]`);
      // running sessions are redrawn each time (their elapsed time moves); finished ones only on change
      if (!node || drawn.get(view.session) !== json || view.runs.some((r) => PROGRESS[r.status] < 100)) {
        const fresh = drawSession(view);
        if (node) node.replaceWith(fresh); else list.append(fresh);
        node = fresh;
        drawn.set(view.session, json);
      }
      // newest first
      if (previous ? previous.nextSibling !== node : list.firstChild !== node) {
        if (previous) previous.after(node); else list.prepend(node);
      }
      previous = node;
    }
    for (const [session] of drawn) {
      if (!seen.has(session)) {
        drawn.delete(session);
        list.querySelector(`[data-session="${CSS.escape(session)}"]`)?.remove();
      }
    }
  } catch (error) {
    document.getElementById("summary").textContent = `Cannot reach the local stack (${error.message}); retrying…`;
  } finally {
    setTimeout(refresh, POLL_MS);
  }
}

async function loadSamples() {
  const { samples } = await (await fetch("/_console/samples")).json();
  const select = document.getElementById("sample");
  for (const sample of samples) select.append(el("option", { value: sample.index }, sample.title));
}

document.getElementById("start-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = document.getElementById("start");
  const status = document.getElementById("start-status");
  const sample = document.getElementById("sample").value;
  button.disabled = true;
  status.textContent = "starting…";
  try {
    const params = new URLSearchParams({ sample, token });
    const answer = await fetch(`/_console/runs?${params}`, { method: "POST" });
    const body = await answer.json();
    status.dataset.started = body.session || "";
    status.textContent = answer.ok
      ? `started ${body.session} (POST /plugin → ${answer.status})`
      : `refused (${answer.status}): ${body.answer ? body.answer.message : body.message}`;
  } catch (error) {
    status.textContent = `failed: ${error.message}`;
  } finally {
    button.disabled = false;
  }
});

loadSamples();
refresh();
