// Choosing the run whose models the service serves (admin): POST /reports/{id}/serve, then wait
// until this worker answers with them (every worker switches within seconds).
window.serveRun = async function (id, status) {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  status.textContent = `Switching to the models of report ${id}…`;
  const res = await fetch(`/reports/${id}/serve`, {
    method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf },
  });
  const payload = await res.json().catch(() => ({}));
  if (!res.ok) {
    status.textContent = `Not switched: ${payload.detail || res.statusText}`;
    return false;
  }
  for (let i = 0; i < 60; i++) {
    await new Promise((r) => setTimeout(r, 1000));
    const ready = await fetch("/readyz").then((r) => r.json()).catch(() => ({}));
    if (ready.run === payload.run_dir) {
      status.textContent = `Serving the models of report ${id}.`;
      return true;
    }
    if (ready.detail && ready.detail.includes(payload.run_dir)) {
      status.textContent = `Not switched: ${ready.detail}`;
      return false;
    }
  }
  status.textContent = "The service has not switched yet; see /readyz.";
  return false;
};
