// Changing the run whose models the service serves (admin): POST to `url` (choose, promote or
// roll back), then wait until this worker answers with the new champion's models (every worker
// switches within seconds).
window.switchRun = async function (url, what, status) {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  status.textContent = `${what}…`;
  const res = await fetch(url, {
    method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf },
  });
  const payload = await res.json().catch(() => ({}));
  if (!res.ok) {
    status.textContent = `Not done: ${payload.detail || res.statusText}`;
    return false;
  }
  const run = payload.champion || payload;
  for (let i = 0; i < 60; i++) {
    await new Promise((r) => setTimeout(r, 1000));
    const ready = await fetch("/readyz").then((r) => r.json()).catch(() => ({}));
    if (ready.run === run.run_dir) {
      status.textContent = `Serving the models of report ${run.id}.`;
      return true;
    }
    if (ready.detail && ready.detail.includes(run.run_dir)) {
      status.textContent = `Not switched: ${ready.detail}`;
      return false;
    }
  }
  status.textContent = "The service has not switched yet; see /readyz.";
  return false;
};

window.serveRun = (id, status) =>
  window.switchRun(`/reports/${id}/serve`, `Switching to the models of report ${id}`, status);
