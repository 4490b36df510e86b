// Inspector page: send images to /predict, show both models' answers, label in one click.
(function () {
  const form = document.getElementById("upload");
  const files = document.getElementById("files");
  const camera = document.getElementById("camera");
  const status = document.getElementById("status");
  const results = document.getElementById("results");
  const { classes, models, queue } = window.INSPECT;
  const queueBox = document.getElementById("queue");
  const queueCount = document.getElementById("queue-count");
  const csrf = document.querySelector('meta[name="csrf-token"]').content;

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  async function send(fileList) {
    if (!fileList.length) { status.textContent = "Choose at least one image."; return; }
    const body = new FormData();
    for (const f of fileList) body.append("files", f);
    const source = document.getElementById("source").value.trim();
    if (source) body.append("source", source);
    status.textContent = `Classifying ${fileList.length} image(s)…`;
    let res;
    try {
      res = await fetch("/predict", {
        method: "POST", body, credentials: "same-origin", headers: { "X-CSRF-Token": csrf },
      });
    } catch (err) {
      status.textContent = `The service did not answer: ${err}`;
      return;
    }
    const payload = await res.json().catch(() => ({}));
    if (!res.ok) {
      const detail = typeof payload.detail === "string" ? payload.detail : JSON.stringify(payload.detail);
      status.textContent = `Not classified: ${detail || res.statusText}`;
      return;
    }
    status.textContent = `${payload.count} image(s) classified. Confirm or correct each label.`;
    payload.data.forEach((pred) => render(pred));
  }

  function render(pred, where = results, onLabelled = null) {
    const card = el("div", { class: "card", "data-prediction": pred.id });
    card.appendChild(el("img", { src: pred.image_url, alt: pred.filename || `part ${pred.id}` }));
    const right = el("div");
    right.appendChild(el("div", {}, `#${pred.id} ${pred.filename || ""}`));
    const answers = el("div", { class: "answers" });
    for (const name of models) {
      const r = pred.results[name];
      const box = el("div", { class: "answer", "data-model": name });
      box.appendChild(el("div", {}, name));
      box.appendChild(el("strong", { class: "model-label" }, r.label));
      box.appendChild(el("div", {}, `${(r.confidence * 100).toFixed(1)}% · ${r.latency_ms.toFixed(1)} ms`));
      answers.appendChild(box);
    }
    right.appendChild(answers);
    right.appendChild(el("p", { class: pred.agree ? "agree" : "disagree" },
      pred.agree ? "The models agree." : "The models disagree: please check this part."));
    if (pred.decision) {
      right.appendChild(el("p", { class: `decision ${pred.decision.action}` },
        `Decision: ${pred.decision.action} (${pred.decision.reason})`));
    }
    const labels = el("div", { class: "labels" });
    const predicted = new Set(Object.values(pred.results).map((r) => r.label));
    for (const c of classes) {
      const b = el("button", { type: "button", "data-label": c, class: predicted.has(c) ? "predicted" : "" }, c);
      b.addEventListener("click", () => label(pred.id, c, labels, done, onLabelled));
      labels.appendChild(b);
    }
    right.appendChild(labels);
    const done = el("p", { class: "label-status" });
    right.appendChild(done);
    card.appendChild(right);
    if (where === results) where.prepend(card); else where.appendChild(card);
  }

  async function label(id, value, labels, done, onLabelled) {
    const res = await fetch(`/predictions/${id}/label`, {
      method: "PUT",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify({ label: value }),
      credentials: "same-origin",
    });
    const payload = await res.json().catch(() => ({}));
    if (!res.ok) { done.textContent = `Not saved: ${payload.detail || res.statusText}`; return; }
    const first = !labels.querySelector("button.chosen");
    labels.querySelectorAll("button").forEach((b) => b.classList.toggle("chosen", b.dataset.label === value));
    done.textContent = `Labelled ${value}.`;
    if (first && onLabelled) onLabelled();
  }

  // The review queue: labelling a part takes it off the count.
  for (const pred of queue) {
    render(pred, queueBox, () => { queueCount.textContent = Math.max(0, Number(queueCount.textContent) - 1); });
  }

  form.addEventListener("submit", (e) => { e.preventDefault(); send(files.files); });
  camera.addEventListener("change", () => send(camera.files));
  ["dragover", "dragenter"].forEach((t) => form.addEventListener(t, (e) => { e.preventDefault(); form.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => form.addEventListener(t, () => form.classList.remove("over")));
  form.addEventListener("drop", (e) => { e.preventDefault(); send(e.dataTransfer.files); });
})();
