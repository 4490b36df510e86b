// Dashboard: an admin chooses which run's models the service serves, promotes the challenger, or
// rolls back to the previous champion.
(function () {
  const status = document.getElementById("serve-status");
  const done = (ok) => { if (ok) window.location.reload(); };
  document.querySelectorAll("button.serve").forEach((button) => {
    button.addEventListener("click", async () => done(await window.serveRun(button.dataset.run, status)));
  });
  document.querySelectorAll("button.challenge").forEach((button) => {
    button.addEventListener("click", async () => {
      const csrf = document.querySelector('meta[name="csrf-token"]').content;
      const res = await fetch(`/runs/${button.dataset.run}/challenge`, {
        method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf },
      });
      const payload = await res.json().catch(() => ({}));
      if (res.ok) window.location.reload();
      else status.textContent = `Not done: ${payload.detail || res.statusText}`;
    });
  });
  const promote = document.getElementById("promote");
  if (promote) {
    promote.addEventListener("click", async () => done(await window.switchRun(
      `/runs/${promote.dataset.run}/promote`, `Promoting report ${promote.dataset.run}`, status)));
  }
  const rollback = document.getElementById("rollback");
  if (rollback) {
    rollback.addEventListener("click", async () => done(await window.switchRun(
      "/runs/rollback", `Rolling back to report ${rollback.dataset.run}`, status)));
  }
})();
