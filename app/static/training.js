// Training page: start a PoC run on a dataset folder, follow its progress, open its report.
(function () {
  const form = document.getElementById("train");
  const status = document.getElementById("status");
  const table = document.getElementById("jobs");
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  let timer = null;

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function detailOf(payload, res) {
    const d = payload.detail;
    if (typeof d === "string") return d;
    if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).slice(1).join(".")}: ${e.msg}`).join("; ");
    return res.statusText;
  }

  function duration(seconds) {
    return seconds < 90 ? `${Math.round(seconds)} s` : `${Math.round(seconds / 60)} min`;
  }

  function timeLeft(seconds) {
    return seconds === null || seconds === undefined ? "" : `, ${duration(seconds)} left`;
  }

  function progressCell(job) {
    const td = el("td");
    const p = job.progress;
    if (!p) return td;
    if (p.epochs_total) {
      const bar = el("progress", { max: p.epochs_total, value: p.epochs_done || 0 });
      td.append(bar, ` ${p.epochs_done || 0}/${p.epochs_total} epochs${timeLeft(p.eta_seconds)}`);
      if (p.detail) td.append(el("br"), el("small", {}, p.detail));
    } else {
      td.textContent = p.stage;
    }
    return td;
  }

  function row(job) {
    const tr = el("tr", { id: `job-${job.id}`, class: `job ${job.state}` });
    tr.append(el("td", {}, `${job.id}`), el("td", {}, job.dataset), el("td", { class: "state" }, job.state));
    tr.append(progressCell(job), el("td", {}, job.requested_by));
    const started = new Date(job.created_at);
    const took = job.finished_at ? ` (took ${duration((new Date(job.finished_at) - started) / 1000)})` : "";
    tr.append(el("td", {}, started.toLocaleString() + took));
    const outcome = el("td");
    if (job.report_url) {
      const a = el("a", { href: job.report_url + "?format=html" }, "report");
      const serve = el("button", { type: "button", class: "serve" }, "Serve these");
      serve.addEventListener("click", () => window.serveRun(job.report_url.split("/").pop(), status));
      outcome.append(a, " ", serve, " ", el("span", {}, job.message || ""));
    } else if (job.message) {
      outcome.append(el("span", { class: job.state === "failed" ? "warn" : "" }, job.message));
    }
    tr.append(outcome);
    const act = el("td");
    if (job.state === "running") {
      const b = el("button", { type: "button", class: "cancel" }, "Cancel");
      b.addEventListener("click", () => cancel(job.id));
      act.append(b);
    }
    tr.append(act);
    return tr;
  }

  async function refresh() {
    let res;
    try {
      res = await fetch("/training/jobs", { credentials: "same-origin" });
    } catch (err) {
      status.textContent = `The service did not answer: ${err}`;
      return;
    }
    const payload = await res.json().catch(() => ({}));
    if (!res.ok) { status.textContent = detailOf(payload, res); return; }
    table.querySelectorAll("tr.job, tr.empty").forEach((tr) => tr.remove());
    payload.data.forEach((job) => table.append(row(job)));
    if (!payload.data.length) {
      const tr = el("tr", { class: "empty" });
      tr.append(el("td", { colspan: 8 }, "No training jobs yet."));
      table.append(tr);
    }
    const running = payload.data.some((j) => j.state === "running");
    clearTimeout(timer);
    if (running) timer = setTimeout(refresh, 2000);
  }

  async function post(url, body) {
    const res = await fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    return [res, await res.json().catch(() => ({}))];
  }

  async function cancel(id) {
    if (!window.confirm(`Stop training job ${id}? Its run is not kept as a report.`)) return;
    const [res, payload] = await post(`/training/jobs/${id}/cancel`);
    status.textContent = res.ok ? `Job ${id} cancelled.` : `Not cancelled: ${detailOf(payload, res)}`;
    refresh();
  }

  if (form) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const data = new FormData(form);
      const inspected = data.get("inspected") || "none";
      const body = {
        dataset: inspected === "alone" ? null : data.get("dataset"),
        inspected,
        models: data.getAll("models"),
        epochs: Number(data.get("epochs")),
        seeds: Number(data.get("seeds")),
        size: Number(data.get("size")),
      };
      if (!body.dataset && inspected !== "alone") { status.textContent = "Choose a dataset."; return; }
      status.textContent = "Starting…";
      const [res, payload] = await post("/training/jobs", body);
      status.textContent = res.ok
        ? `Job ${payload.id} started on ${payload.dataset}.`
        : `Not started: ${detailOf(payload, res)}`;
      refresh();
    });
  }
  refresh();
})();
