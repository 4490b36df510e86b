// Dashboard: an admin chooses which run's models the service serves.
(function () {
  const status = document.getElementById("serve-status");
  document.querySelectorAll("button.serve").forEach((button) => {
    button.addEventListener("click", async () => {
      if (await window.serveRun(button.dataset.run, status)) window.location.reload();
    });
  });
})();
