// Dashboard: an admin chooses which run's models the service serves.
(function () {
  const status = document.getElementById("serve-status");
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  document.querySelectorAll("button.serve").forEach((button) => {
    button.addEventListener("click", async () => {
      const id = button.dataset.run;
      status.textContent = `Switching to the models of report ${id}…`;
      const res = await fetch(`/reports/${id}/serve`, {
        method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf },
      });
      const payload = await res.json().catch(() => ({}));
      if (!res.ok) {
        status.textContent = `Not switched: ${payload.detail || res.statusText}`;
        return;
      }
      // Every worker loads them and switches within seconds; reload once this one has.
      for (let i = 0; i < 60; i++) {
        await new Promise((r) => setTimeout(r, 1000));
        const ready = await fetch("/readyz").then((r) => r.json()).catch(() => ({}));
        if (ready.run === payload.run_dir) { window.location.reload(); return; }
        if (ready.detail && ready.detail.includes(payload.run_dir)) {
          status.textContent = `Not switched: ${ready.detail}`;
          return;
        }
      }
      status.textContent = "The service has not switched yet; see /readyz.";
    });
  });
})();
