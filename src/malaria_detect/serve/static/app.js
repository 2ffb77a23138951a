// malaria-detect screening page: no framework, no build step, no CDN; talks to /predict, /model and
// /summary. The page makes no count: every count, fraction, interval and note it shows is the server's
// (POST /summary pools the answers on the page by the one counting rule, counting.py).
//
// Layout of this file: shared helpers (DOM, the model record, the API, CSV, file drop, the larger
// view), then one factory per mode. A mode owns a <section class="mode-panel" data-mode="ID"
// data-title="TITLE"> in index.html and is added with registerMode({id, title, panel, onShow}); the tab list
// appears by itself once two modes are registered. Three modes: "Single cells" (cellsMode below),
// "Whole fields" (fields.js) and "Samples" (samples.js); the helpers are exported as window.malariaDetect.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- shared helpers
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  const pct = (x, digits = 1) => (100 * x).toFixed(digits) + "%";
  const plural = (n, one, many) => `${n} ${n === 1 ? one : many || one + "s"}`;
  const mib = (bytes) => `${+(bytes / 2 ** 20).toFixed(1)} MB`;

  // The model record (GET /model). Class names come from it: [negative, positive].
  const model = {
    record: null,
    classNames: ["Uninfected", "Parasitized"],
    limits: { max_files: 64, max_file_bytes: 10 * 2 ** 20, max_pixels: 16e6 },
    get neg() { return this.classNames[0]; },
    get pos() { return this.classNames[1]; },
  };
  const modelReady = fetch("/model")
    .then((r) => (r.ok ? r.json() : Promise.reject(new Error(`HTTP ${r.status}`))))
    .then((m) => {
      model.record = m;
      if (Array.isArray(m.class_names) && m.class_names.length === 2) model.classNames = m.class_names;
      model.limits = Object.assign(model.limits, m.limits || {});
      return m;
    });

  const api = {
    // POST files in requests of at most limits.max_files; onChunk(files, answer) after each one,
    // answer = {ok: true, results} or {ok: false, status, detail}; onChunk returns false to stop.
    async predict(files, onChunk) {
      for (let i = 0; i < files.length; i += model.limits.max_files) {
        const chunk = files.slice(i, i + model.limits.max_files);
        const form = new FormData();
        chunk.forEach((f) => form.append("files", f, f.name));
        let answer;
        try {
          const resp = await fetch("/predict", { method: "POST", body: form });
          const body = await resp.json().catch(() => ({}));
          answer = resp.ok ? { ok: true, results: body }
            : { ok: false, status: resp.status, detail: body.detail || resp.statusText };
        } catch (e) {
          answer = { ok: false, status: 0, detail: "could not reach the server (" + e.message + ")" };
        }
        if (onChunk(chunk, answer) === false) return;
      }
    },
    // POST /summary: the server's counts of answers the page has. body = {cells: [...]} and/or
    // {fields: [...]}; resolves to {ok: true, fields, cells} or {ok: false, status, detail}.
    async summary(body) {
      try {
        const resp = await fetch("/summary", { method: "POST", headers: { "content-type": "application/json" },
          body: JSON.stringify(body) });
        const answer = await resp.json().catch(() => ({}));
        if (resp.ok) return Object.assign({ ok: true }, answer);
        let detail = answer.detail || resp.statusText;
        if (typeof detail !== "string") detail = (detail[0] && detail[0].msg) || JSON.stringify(detail);
        return { ok: false, status: resp.status, detail };
      } catch (e) {
        return { ok: false, status: 0, detail: "could not reach the server (" + e.message + ")" };
      }
    },
  };

  // The columns of a CSV download, as the server (and the command line) names them: kind "cells"
  // or "fields" (GET /model's csv_columns); null while the model record is not loaded.
  const csvColumns = (kind) => (model.record && model.record.csv_columns && model.record.csv_columns[kind]) || null;

  // Like the command line's CSV: a cell that a spreadsheet would run as a formula (= + - @ tab CR
  // first, e.g. from an uploaded file's name) gets a leading apostrophe.
  function downloadCsv(filename, header, rows) {
    const cell = (v) => {
      let s = v === null || v === undefined ? "" : String(v);
      if (/^[=+\-@\t\r]/.test(s)) s = "'" + s;
      return /[",\r\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
    };
    const text = [header].concat(rows).map((r) => r.map(cell).join(",")).join("\n") + "\n";
    const a = el("a");
    a.href = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
    a.download = filename;
    document.body.appendChild(a);
    a.click();
    a.remove();
  }

  // A <label class="dropzone"> wrapping a visually hidden <input type=file>: the input is the only
  // tab stop (Enter or Space opens the file picker); dropping files anywhere on the zone works too.
  function fileDrop(zone, input, onFiles) {
    input.addEventListener("change", () => { onFiles(Array.from(input.files)); input.value = ""; });
    ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => {
      e.preventDefault(); zone.classList.add("over");
    }));
    ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, (e) => {
      e.preventDefault(); zone.classList.remove("over");
    }));
    zone.addEventListener("drop", (e) => onFiles(Array.from(e.dataTransfer.files)));
  }

  // The larger view: a modal <dialog>; Escape, the Close button or a click outside closes it and
  // focus goes back to what opened it.
  const viewer = (function () {
    const dlg = $("viewer");
    let opener = null;
    const close = () => dlg.close();
    $("viewer-close").addEventListener("click", close);
    dlg.addEventListener("click", (e) => { if (e.target === dlg) close(); });
    dlg.addEventListener("close", () => { if (opener) opener.focus(); opener = null; });
    return {
      open(title, body, from) {
        $("viewer-title").textContent = title;
        $("viewer-body").replaceChildren(...body);
        opener = from || document.activeElement;
        dlg.showModal();
      },
    };
  })();

  // The heatmap legend (same colours as the server's inferno scale in cells/heatmaps.py).
  function legend() {
    const l = $("legend").cloneNode(true);
    l.removeAttribute("id");
    l.hidden = false;
    return l;
  }

  // ---------------------------------------------------------------- model details panel
  function renderModel(m) {
    const t = m.test_metrics, v = m.val_metrics, ci = (t && t.ci95) || {};
    $("model-acc").textContent = t
      ? `${pct(t.accuracy)} accuracy, sensitivity ${pct(t.recall)}, specificity ${pct(t.specificity)} ` +
        `(${t.n_patients} test patients).`
      : "not recorded for this model.";
    const panel = $("model-panel");
    panel.replaceChildren();
    const dl = el("dl", "facts");
    const fact = (k, val) => { if (val !== undefined && val !== null && val !== "") dl.append(el("dt", null, k), el("dd", null, val)); };
    fact("Model file", m.file);
    fact("Network", m.arch);
    fact("Input", m.input_size && `${m.input_size} × ${m.input_size} px RGB`);
    fact("Classes", `${model.neg} (negative) · ${model.pos} (positive)`);
    fact("Decision", m.threshold != null &&
      `${model.pos} when p(${model.pos}) ≥ ${m.threshold.toFixed(3)}` + (m.threshold_rule ? ` (${m.threshold_rule})` : ""));
    fact("Calibration", m.temperature != null && `temperature scaling, T = ${m.temperature.toFixed(3)}`);
    fact("Not a cell", m.ood_threshold != null &&
      `flagged when the not-a-cell score is above ${m.ood_threshold.toFixed(2)}; such images are left out of the counts`);
    if (m.limits) {
      fact("Upload limits", `${m.limits.max_files} files per request · ${mib(m.limits.max_file_bytes)} per file · ` +
        `${+(m.limits.max_pixels / 1e6).toFixed(1)} megapixels per image`);
      if (m.limits.max_fields) {
        fact("Whole fields", `${m.limits.max_fields} fields per request · ${mib(m.limits.max_field_bytes)} per field · ` +
          `${+(m.limits.max_field_pixels / 1e6).toFixed(1)} megapixels per field`);
      }
    }
    fact("Intended use", m.intended_use);
    panel.append(dl);
    if (t) {
      const rows = [["Accuracy", "accuracy"], ["Sensitivity (recall)", "recall"], ["Specificity", "specificity"],
        ["Precision", "precision"], ["F1", "f1"], ["MCC", "mcc"], ["ROC-AUC", "roc_auc"]];
      const table = el("table", "metrics");
      const cap = el("caption", null, `Measured on ${t.n_images != null ? t.n_images.toLocaleString("en") + " cells of " : ""}` +
        `${t.n_patients} test patients the model never saw; 95 % intervals from a bootstrap over patients.`);
      const head = el("tr");
      ["Metric", "Test", "95 % interval", "Validation"].forEach((h) => { const th = el("th", null, h); th.scope = "col"; head.append(th); });
      table.append(cap, el("thead"), el("tbody"));
      table.tHead.append(head);
      const f = (x) => (x == null ? "–" : x.toFixed(3));
      rows.forEach(([name, key]) => {
        if (t[key] == null) return;
        const tr = el("tr");
        const th = el("th", null, name); th.scope = "row";
        tr.append(th, el("td", null, f(t[key])),
          el("td", null, ci[key] ? `${f(ci[key][0])} – ${f(ci[key][1])}` : "–"),
          el("td", null, f(v && v[key])));
        table.tBodies[0].append(tr);
      });
      panel.append(table);
    }
    const raw = el("p", "note");
    const a = el("a", null, "the same record as JSON");
    a.href = "/model";
    raw.append("For programs: ", a, " (GET /model).");
    panel.append(raw);
  }

  // ---------------------------------------------------------------- modes
  const modes = [];
  const tabs = $("mode-tabs");

  function showMode(id) {
    modes.forEach((m) => {
      const on = m.id === id;
      const was = !m.panel.hidden;
      m.panel.hidden = !on;
      if (m.tab) { m.tab.setAttribute("aria-selected", String(on)); m.tab.tabIndex = on ? 0 : -1; }
      if (on && !was && m.onShow) m.onShow(); // e.g. the Samples list loads when it is shown
    });
  }

  function registerMode(mode) {
    modes.push(mode);
    tabs.hidden = modes.length < 2;
    if (modes.length < 2) return;
    tabs.replaceChildren();
    modes.forEach((m, i) => {
      m.tab = el("button", "tab", m.title);
      m.tab.type = "button";
      m.tab.id = "tab-" + m.id;
      m.tab.setAttribute("role", "tab");
      m.tab.setAttribute("aria-controls", m.panel.id);
      m.panel.setAttribute("role", "tabpanel");
      m.panel.setAttribute("aria-labelledby", m.tab.id);
      m.tab.addEventListener("click", () => showMode(m.id));
      m.tab.addEventListener("keydown", (e) => {
        const d = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
        if (!d) return;
        const next = modes[(i + d + modes.length) % modes.length];
        showMode(next.id);
        next.tab.focus();
      });
      tabs.append(m.tab);
    });
    showMode(modes[0].id);
  }

  // ---------------------------------------------------------------- mode: single cells
  function cellsMode(panel) {
    const q = (sel) => panel.querySelector(sel);
    const list = q("#results"), status = q("#status"), heatToggle = q("#show-heatmaps");
    const sortSel = q("#sort"), onlyPos = q("#only-pos");
    const items = []; // {file, r, li}, in upload order
    let queue = Promise.resolve();
    let totals = null; // the server's summary of every answer on the page (POST /summary), or null

    // a card's colour and filter, from the answer's label and flag (the counts are the server's)
    const kind = (r) => (r.error ? "error" : r.ood ? "ood" : r.label === model.pos ? "pos" : "neg");

    // the server's counts of these answers: {images, classified, <class names>, parasitized_fraction, ...}
    async function summarize(its) {
      const s = await api.summary({ cells: its.map(({ r }) => ({ label: r.label == null ? null : r.label,
        ood: r.ood == null ? null : r.ood, error: Boolean(r.error) })) });
      return s.ok ? s.cells : { failed: s.detail };
    }

    function figure(caption, node, cls) {
      const f = el("figure", cls);
      f.append(node, el("figcaption", null, caption));
      return f;
    }

    function cellImage(it, alt) {
      const img = el("img");
      img.alt = alt;
      img.src = it.url;
      img.addEventListener("error", () => img.replaceWith(el("span", "noimg", "no preview in this browser")), { once: true });
      return img;
    }

    function heatImage(r, alt) {
      const img = el("img", "heat");
      img.alt = alt;
      img.src = r.heatmap;
      return img;
    }

    function verdict(r) {
      const out = [];
      const k = kind(r);
      if (k === "error") {
        out.push(el("p", "label error", "Unreadable file"), el("p", "why", r.error));
        return out;
      }
      out.push(el("p", "label " + k, k === "ood" ? "Not a cell" : r.label));
      const p = r.p_parasitized;
      if (k === "ood") {
        out.push(el("p", "why", "This does not look like a single red-cell crop, so it is left out of the counts. " +
          `The model would have said ${r.label} (p = ${p.toFixed(2)}), which is unreliable here.`));
        return out;
      }
      const bar = el("div", "bar");
      bar.setAttribute("role", "img");
      bar.setAttribute("aria-label", `probability ${model.pos} ${pct(p)}`);
      const fill = el("span");
      fill.style.width = pct(p);
      bar.append(fill);
      out.push(bar, el("p", "prob", `p(${model.pos}) = ${p.toFixed(3)}`));
      return out;
    }

    function openLarge(it, from) {
      const r = it.r;
      const pics = el("div", "viewer-pics");
      pics.append(figure("Cell as uploaded", cellImage(it, `cell image ${r.filename}`)));
      if (r.heatmap) pics.append(figure("Heatmap", heatImage(r, `heatmap of ${r.filename}`)));
      const v = el("div", "viewer-verdict " + kind(r));
      v.append(...verdict(r));
      const body = [v, pics];
      if (r.heatmap) body.push(legend());
      viewer.open(r.filename, body, from);
    }

    function card(it) {
      const r = it.r, k = kind(r);
      const li = el("li", "result " + k);
      let thumb;
      if (k === "error") {
        thumb = el("div", "thumb unreadable");
        thumb.append(el("span", "icon", "⚠"), el("span", null, "could not be read"));
        thumb.setAttribute("aria-hidden", "true");
      } else {
        thumb = el("button", "thumb");
        thumb.type = "button";
        thumb.setAttribute("aria-label", `Larger view of ${r.filename}`);
        thumb.append(figure("cell", cellImage(it, "")));
        if (r.heatmap) thumb.append(figure("heatmap", heatImage(r, ""), "heat"));
        thumb.addEventListener("click", () => openLarge(it, thumb));
      }
      li.append(thumb, el("p", "name", r.filename), ...verdict(r));
      return li;
    }

    // s: the server's summary of every answer on the page (null: none on the page)
    function updateSummary(s) {
      totals = s && !s.failed ? s : null;
      q("#summary").hidden = q("#toolbar").hidden = !s;
      const t = totals || {};
      const show = (id, v) => { q(id).textContent = v == null ? "–" : v; };
      show("#n-cells", t.classified);
      show("#n-par", t[model.pos]);
      q("#frac-par").textContent = t.parasitized_fraction == null ? "–" : pct(t.parasitized_fraction);
      show("#n-ood", t.not_a_cell);
      show("#n-err", t.errors);
    }

    // Sort and filter: cards are moved, never re-created.
    function arrange() {
      const order = items.slice();
      const key = (it) => (it.r.error ? null : it.r.p_parasitized);
      if (sortSel.value !== "upload") {
        const dir = sortSel.value === "p-desc" ? -1 : 1;
        order.sort((a, b) => {
          const x = key(a), y = key(b);
          if (x === null || y === null) return (x === null) - (y === null); // unreadable files last
          return dir * (x - y);
        });
      }
      order.forEach((it) => {
        it.li.hidden = onlyPos.checked && kind(it.r) !== "pos";
        list.append(it.li);
      });
      const note = q("#shown");
      note.hidden = !onlyPos.checked || !items.length;
      if (!totals) note.textContent = `Showing the cells classified ${model.pos}.`;
      else if (totals[model.pos]) {
        note.textContent = `Showing ${totals[model.pos]} of ${plural(totals.images, "result")}: cells classified ${model.pos}.`;
      } else note.textContent = `None of the ${plural(totals.images, "result")} is a cell classified ${model.pos}.`;
    }

    function add(file, r) {
      const it = { file, r, url: URL.createObjectURL(file) };
      it.li = card(it);
      items.push(it);
      return it;
    }

    // the status line: c is the server's summary of this batch, totals of every answer on the page
    function report(batch, refused, total, c, all) {
      let msg;
      if (!batch.length) msg = "";
      else if (c.failed) msg = `Screened ${plural(batch.length, "image")}; the server could not count them: ${c.failed}.`;
      else if (c.errors === c.images) msg = `None of the ${plural(c.images, "image")} could be read: see the cards for why.`;
      else {
        const parts = [plural(c.classified, "cell") + (c.classified ? ` (${c[model.pos]} ${model.pos})` : "")];
        if (c.not_a_cell) parts.push(`${c.not_a_cell} not a cell`);
        if (c.errors) parts.push(`${c.errors} unreadable`);
        msg = `Screened ${plural(c.images, "image")}: ${parts.join(", ")}.`;
      }
      if (refused) {
        msg = (batch.length ? `Screened ${batch.length} of ${total} images, then the` : "The") +
          ` server refused the upload (${refused.status || "no answer"}): ${refused.detail}. ` + msg.replace(/^Screened [^:]*: /, "");
      }
      if (totals && !c.failed && totals.images > c.images) msg += ` ${plural(totals.images, "image")} on the page in all.`;
      if (all && all.failed) msg += ` The server could not count the answers on the page: ${all.failed}.`;
      status.textContent = msg.trim();
    }

    async function screen(files) {
      if (!files.length) return;
      await modelReady.catch(() => null);
      const batch = [];
      let refused = null;
      const tooBig = files.filter((f) => f.size > model.limits.max_file_bytes);
      const toSend = files.filter((f) => f.size <= model.limits.max_file_bytes);
      tooBig.forEach((f) => batch.push(add(f, { filename: f.name,
        error: `file too large: ${mib(f.size)} (limit ${mib(model.limits.max_file_bytes)} per file)` })));
      status.textContent = `Screening ${plural(files.length, "image")}…`;
      await api.predict(toSend, (chunk, answer) => {
        if (answer.ok) answer.results.forEach((r, j) => batch.push(add(chunk[j], r)));
        else if (answer.status === 415) { // none of the chunk's files is a supported image: one card each
          chunk.forEach((f) => batch.push(add(f, { filename: f.name, error: answer.detail })));
        } else {
          refused = answer;
          return false;
        }
        batch.forEach((it) => { if (!it.li.isConnected) list.append(it.li); });
        status.textContent = `Screening ${plural(files.length, "image")}… ${batch.length} done`;
        return true;
      });
      batch.forEach((it) => { if (!it.li.isConnected) list.append(it.li); });
      const [mine, all] = await Promise.all([batch.length ? summarize(batch) : {},
        items.length ? summarize(items.slice()) : null]);
      updateSummary(all);
      arrange();
      report(batch, refused, files.length, mine, all);
    }

    const enqueue = (files) => { queue = queue.then(() => screen(files)); return queue; };

    fileDrop(q("#dropzone"), q("#file-input"), enqueue);
    panel.querySelectorAll("button.example").forEach((b) => b.addEventListener("click", async () => {
      const src = b.dataset.src;
      try {
        const blob = await (await fetch(src)).blob();
        await enqueue([new File([blob], src.split("/").pop(), { type: blob.type || "image/webp" })]);
      } catch (e) {
        status.textContent = "Could not load the example: " + e.message;
      }
    }));
    heatToggle.addEventListener("change", () => {
      list.classList.toggle("show-heat", heatToggle.checked);
      $("legend").hidden = !heatToggle.checked;
    });
    sortSel.addEventListener("change", arrange);
    onlyPos.addEventListener("change", arrange);
    q("#clear").addEventListener("click", () => {
      items.forEach((it) => URL.revokeObjectURL(it.url));
      items.length = 0;
      list.replaceChildren();
      status.textContent = "Cleared.";
      updateSummary(null);
      arrange();
    });
    // The command line's CSV (malaria-detect predict --csv): its columns come from the server.
    const cellValue = {
      path: (r) => r.filename, label: (r) => r.label || "",
      p_parasitized: (r) => (r.p_parasitized == null ? "" : r.p_parasitized.toFixed(6)),
      ood: (r) => (r.ood == null ? "" : String(r.ood)), error: (r) => r.error || "",
    };
    q("#download-csv").addEventListener("click", () => {
      const cols = csvColumns("cells");
      if (!cols) { status.textContent = "The CSV needs the model record from the server, which is not loaded."; return; }
      downloadCsv("malaria-detect-results.csv", cols,
        items.map(({ r }) => cols.map((k) => (cellValue[k] ? cellValue[k](r) : r[k]))));
    });

    return { id: "cells", title: panel.dataset.title, panel };
  }

  // ---------------------------------------------------------------- start
  modelReady.then((m) => {
    document.querySelectorAll(".pos-name").forEach((s) => { s.textContent = model.pos; });
    renderModel(m);
  }).catch((e) => {
    $("model-acc").textContent = "unavailable.";
    $("model-panel").replaceChildren(el("p", "error", "Could not load the model record: " + e.message));
  });
  $("model-link").addEventListener("click", () => { $("model-details").open = true; });
  registerMode(cellsMode($("mode-cells")));
  // A second mode (e.g. whole microscope fields) lives in its own <section class="mode-panel"> and
  // script, and registers itself: malariaDetect.registerMode({id, title, panel}).
  window.malariaDetect = { registerMode, showMode, api, model, modelReady, el, pct, plural, fileDrop,
    downloadCsv, csvColumns, viewer, legend };
})();
