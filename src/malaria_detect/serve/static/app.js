// malaria-detect screening page: no framework, no CDN; talks to /predict and /model.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const input = $("file-input"), zone = $("dropzone"), list = $("results"), status = $("status");
  const rows = [];            // one per result, for the summary and the CSV
  let limits = { max_files: 64, max_file_bytes: 10 * 1024 * 1024 };

  fetch("/model").then((r) => r.json()).then((m) => {
    limits = m.limits || limits;
    const t = m.test_metrics;
    $("model-acc").textContent = t
      ? `${(100 * t.accuracy).toFixed(1)}% accuracy, sensitivity ${(100 * t.recall).toFixed(1)}%, ` +
        `specificity ${(100 * t.specificity).toFixed(1)}% (${m.arch}, ${t.n_patients} test patients)`
      : `not recorded for this model (${m.arch})`;
  }).catch(() => { $("model-acc").textContent = "unavailable"; });

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function addResult(file, r) {
    const li = el("li", "result");
    li.dataset.label = r.label || "";
    const pics = el("div", "pics");
    const img = el("img");
    img.alt = `cell image ${r.filename}`;
    img.src = URL.createObjectURL(file);
    pics.appendChild(img);
    if (r.heatmap) {
      const h = el("img", "heat");
      h.alt = `heatmap of ${r.filename}: warm colours mark evidence for parasitized`;
      h.src = r.heatmap;
      pics.appendChild(h);
    }
    li.appendChild(pics);
    li.appendChild(el("div", "name", r.filename));
    if (r.error) {
      li.appendChild(el("div", "error", "Could not read: " + r.error));
    } else {
      li.appendChild(el("div", "label " + r.label, r.label));
      const bar = el("div", "bar");
      bar.setAttribute("role", "img");
      bar.setAttribute("aria-label", `probability parasitized ${(100 * r.p_parasitized).toFixed(1)} percent`);
      const fill = el("span");
      fill.style.width = (100 * r.p_parasitized).toFixed(1) + "%";
      bar.appendChild(fill);
      li.appendChild(bar);
      li.appendChild(el("div", "prob", `p(parasitized) = ${r.p_parasitized.toFixed(3)}`));
      if (r.ood) li.appendChild(el("div", "ood", "⚠ This does not look like a single red-cell crop: the answer is unreliable."));
    }
    list.appendChild(li);
    rows.push(r);
  }

  function updateSummary() {
    const ok = rows.filter((r) => !r.error);
    const cells = ok.filter((r) => !r.ood);
    const par = cells.filter((r) => r.label === "Parasitized").length;
    $("summary").hidden = rows.length === 0;
    $("n-cells").textContent = cells.length;
    $("n-par").textContent = par;
    $("frac-par").textContent = cells.length ? (100 * par / cells.length).toFixed(1) + "%" : "–";
    $("n-other").textContent = (ok.length - cells.length) + " / " + (rows.length - ok.length);
    $("download-csv").disabled = $("clear").disabled = rows.length === 0;
  }

  async function send(files) {
    files = Array.from(files);
    if (!files.length) return;
    let done = 0;
    for (let i = 0; i < files.length; i += limits.max_files) {
      const chunk = files.slice(i, i + limits.max_files);
      const form = new FormData();
      chunk.forEach((f) => form.append("files", f, f.name));
      status.textContent = `Screening ${files.length} image(s)… ${done} done`;
      try {
        const resp = await fetch("/predict", { method: "POST", body: form });
        const body = await resp.json();
        if (!resp.ok) {
          status.textContent = `The server refused the upload (${resp.status}): ${body.detail || resp.statusText}`;
          return;
        }
        body.forEach((r, j) => addResult(chunk[j], r));
      } catch (e) {
        status.textContent = "Could not reach the server: " + e;
        return;
      }
      done += chunk.length;
      updateSummary();
    }
    status.textContent = `Screened ${done} image(s).`;
  }

  input.addEventListener("change", () => { send(input.files); input.value = ""; });
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => {
    e.preventDefault(); zone.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, (e) => {
    e.preventDefault(); zone.classList.remove("over");
  }));
  zone.addEventListener("drop", (e) => send(e.dataTransfer.files));
  $("show-heatmaps").addEventListener("change", (e) => list.classList.toggle("hide-heat", !e.target.checked));
  $("clear").addEventListener("click", () => {
    rows.length = 0; list.innerHTML = ""; status.textContent = ""; updateSummary();
  });
  $("download-csv").addEventListener("click", () => {
    const q = (v) => `"${String(v ?? "").replace(/"/g, '""')}"`;
    const lines = ["filename,label,p_parasitized,ood,error"].concat(rows.map((r) =>
      [q(r.filename), q(r.label), r.p_parasitized == null ? "" : r.p_parasitized.toFixed(6),
       r.ood == null ? "" : r.ood, q(r.error)].join(",")));
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([lines.join("\n") + "\n"], { type: "text/csv" }));
    a.download = "malaria-detect-results.csv";
    document.body.appendChild(a); a.click(); a.remove();
  });
})();
