// malaria-detect screening page, mode "Whole fields": microscope field images -> POST /smear.
//
// Each field is sent on its own (POST /smear?overlay=true, one file), so the status line can say
// which field the server is on and each field appears as soon as it is done. The field is drawn
// from the ORIGINAL upload (an object URL) with the cells' boxes in an SVG on top, in a scrolling,
// zoomable view; the server's annotated JPEG (`overlay`) is only offered as a download, and used
// as the picture when this browser cannot show the upload itself (e.g. TIFF). Each field card shows
// the counts of its record; what is shown for all the fields together (counts, parasitemia, its
// interval, the WHO note) is the server's pooling of the records (POST /summary): the page makes no
// count. Needs app.js first (window.malariaDetect).
//
// The sample and its review: each field is sent with the sample id (the bar above the drop zone) and
// the server keeps it (store.py), numbering it (field_id). A person's decision on a cell (gallery,
// a click in the field, or the keys) goes to POST /samples/{id}/reviews; what the page draws is the
// decisions in force as the server answered them, and the model's and reviewed counts side by side
// are the server's (GET /samples/{id}/review). openSample() shows a stored sample (samples.js).
"use strict";
(function () {
  const md = window.malariaDetect;
  const panel = document.getElementById("mode-fields");
  if (!md || !panel) return;
  const { el, plural, model, modelReady, fileDrop, downloadCsv, csvColumns, api } = md;
  const q = (sel) => panel.querySelector(sel);
  const SVG = "http://www.w3.org/2000/svg";
  const MAX_ZOOM = 8;         // screen pixels per field pixel
  const STEP = 1.5;           // one zoom step

  const list = q("#fields-results"), status = q("#fields-status"), progress = q("#fields-progress");
  const gallery = q("#fields-gallery"), galleryList = q("#gallery-list");
  const fields = []; // {file, name, url, rec, card, view}, in upload order
  let queue = Promise.resolve();
  let uid = 0, generation = 0; // Clear starts a new generation: answers for an older one are dropped

  // ---------------------------------------------------------------- the sample and the reviewer
  const sampleInput = q("#sample-id"), reviewerInput = q("#reviewer");
  const printLink = q("#print-report"), pdfLink = q("#report-pdf");
  const REVIEWER_KEY = "malaria-detect.reviewer";
  const newSampleId = () => "slide-" + new Date().toISOString().slice(0, 16).replace("T", "-").replace(":", "");
  sampleInput.value = newSampleId();
  try { reviewerInput.value = localStorage.getItem(REVIEWER_KEY) || ""; } catch (e) { /* storage off */ }
  reviewerInput.addEventListener("change", () => {
    try { localStorage.setItem(REVIEWER_KEY, reviewerInput.value.trim()); } catch (e) { /* storage off */ }
  });
  const sampleId = () => sampleInput.value.trim();
  // as store.check_sample_id: an id every route and file name can hold
  const badSampleId = (id) => id.length > 200 || /[\/\\\u0000-\u001f\u007f]/.test(id) || id === "." || id === "..";
  const samplePath = () => "/samples/" + encodeURIComponent(sampleId());
  let decisions = {};   // field_id -> {cell key -> the decision in force}, as the server answered
  let reviewed = null;  // the server's {review, reviewed, model} of this sample

  // ---------------------------------------------------------------- counts (the server's)
  const analysed = (f) => f.rec && !f.rec.error; // answered, without an error
  // a box's colour and the gallery, from the cell's label and flag (the counts are the server's)
  // the display class of an object: white cells and platelets (never classified) in their own style
  const OTHER = { "white cell": "wbc", platelet: "plt", other: "oth" };
  // a cell's probability as the server computed it; with the cell head's when the second opinion was asked
  const pText = (c) => `p = ${c.p_parasitized.toFixed(3)}`
    + (c.p_cell_head != null ? ` (second opinion, cell head p = ${c.p_cell_head.toFixed(3)})` : "");
  const kind = (c) => OTHER[c.kind] || (c.ood ? "ood" : c.label == null ? "unc" : c.label === model.pos ? "pos" : "neg");

  // How an object is drawn now: the model's call, or the decision in force on it ({cls, stage, mark}).
  const decisionOn = (f, key) => (decisions[f.rec.field_id] || {})[key];
  function look(f, c, key) {
    const d = decisionOn(f, key), k = kind(c);
    if (!d || d.action === "seen" || (OTHER[c.kind] && d.action === "reject")) return { cls: k, stage: c.stage, mark: "" };
    if (d.action === "reject") return k === "pos" ? { cls: "neg rejected", stage: null, mark: "✗ rejected" }
      : { cls: k, stage: c.stage, mark: "" }; // a cell the model did not call stays as it was
    const stage = d.stage || c.stage;
    return { cls: "pos reviewed", stage, mark: k !== "pos" ? "+ called by the reviewer"
      : stage !== c.stage ? "✓ re-staged" : "✓ confirmed" };
  }
  // the infected cells a person added to a field: [{key, box, stage}]
  const additions = (f) => Object.entries(decisions[f.rec.field_id] || {})
    .filter(([, d]) => d.action === "add").map(([key, d]) => ({ key, box: d.box, stage: d.stage }));

  // Parasitemia is often well under 1 %: two decimals.
  const pc = (x) => (100 * x).toFixed(2) + "%";
  // a parasitized cell's stage, as the overlays letter it
  const STAGE_SHORT = { ring: "R", trophozoite: "T", schizont: "S", gametocyte: "G" };
  const pcRange = (ci) => `${(100 * ci[0]).toFixed(2)}–${pc(ci[1])}`;

  // The server's pooling of these fields' records (POST /summary): counts, parasitemia, its
  // interval, n_fields, n_errors, n_analysed and the note; {failed: why} when it could not.
  const COUNT_KEYS = ["n_cells", "n_classified", "n_parasitized", "n_not_a_cell", "n_unclassified",
    "n_white_cells", "n_platelets", "n_by_stage"];
  async function pooled(fs) {
    const records = fs.filter((f) => f.rec).map((f) => (f.rec.error ? { error: true }
      : Object.fromEntries(COUNT_KEYS.filter((k) => f.rec[k] != null).map((k) => [k, f.rec[k]]))));
    const s = await api.summary({ fields: records });
    return s.ok ? s.fields : { failed: s.detail };
  }

  // ---------------------------------------------------------------- the API
  async function smear(file) {
    const form = new FormData();
    form.append("files", file, file.name);
    try {
      let resp;
      // 503: the server's field workers and queue are full (other users): wait as long as it says, a few times
      for (let tries = 0; ; tries++) {
        const sample = sampleId() ? "&sample=" + encodeURIComponent(sampleId()) : "";
        resp = await fetch("/smear?overlay=true" + sample, { method: "POST", body: form });
        if (resp.status !== 503 || tries >= 5) break;
        const wait = Math.min(30, Math.max(1, Number(resp.headers.get("retry-after")) || 2));
        await new Promise((done) => setTimeout(done, wait * 1000));
      }
      const body = await resp.json().catch(() => ({}));
      if (resp.ok && body.fields && body.fields.length === 1) return body.fields[0];
      let detail = body.detail || resp.statusText || "no answer";
      if (typeof detail !== "string") detail = (detail[0] && detail[0].msg) || JSON.stringify(detail);
      return failed(file.name, `${detail} (HTTP ${resp.status})`);
    } catch (e) {
      return failed(file.name, "could not reach the server (" + e.message + ")");
    }
  }

  function failed(name, error) {
    return { image: name, width: null, height: null, cells: [], error };
  }

  // ---------------------------------------------------------------- the zoomable field view
  // A scroll container the shape of the field holding a stage (the image, an SVG of the boxes and
  // the probability tags) that is zoom x the field's size. Scrolling pans; buttons, Ctrl+wheel
  // (pinch), double-click and the keys + - 0 1 zoom; a mouse can drag to pan.
  function fieldView(f) {
    const rec = f.rec, name = f.name;
    const W = rec.width, H = rec.height;
    const view = el("div", "field-view");
    view.tabIndex = 0;
    view.setAttribute("role", "group");
    view.setAttribute("aria-label", `${name}: ${plural(rec.n_cells, "cell")} boxed. ` +
      "Keys: + and − zoom, 0 fits, arrows pan; A marks a missed infected cell; Y, N, R, T, S, G, U review the outlined cell.");
    view.style.aspectRatio = `${W} / ${H}`;
    const stage = el("div", "field-stage");
    const img = el("img", "field-img");
    img.alt = `microscope field ${name}`;
    img.draggable = false;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "boxes");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("aria-hidden", "true");
    const tags = el("div", "tags");
    tags.setAttribute("aria-hidden", "true");
    const box = (b, cls, key) => {
      const r = document.createElementNS(SVG, "rect");
      r.setAttribute("x", b[0]); r.setAttribute("y", b[1]);
      r.setAttribute("width", b[2] - b[0]); r.setAttribute("height", b[3] - b[1]);
      r.setAttribute("class", "cell " + cls);
      r.setAttribute("vector-effect", "non-scaling-stroke");
      r.dataset.cell = key;
      r.append(document.createElementNS(SVG, "title"));
      svg.append(r);
      return r;
    };
    const rects = rec.cells.map((c, i) => box(c.box, kind(c), String(i)));
    const tag = (b, text, title) => {
      const t = el("span", "tag", text);
      if (title) t.title = title;
      t.style.left = (100 * b[0]) / W + "%";
      t.style.top = (100 * b[1]) / H + "%";
      tags.append(t);
    };
    let extra = []; // the added cells' boxes
    // draw the boxes as the model called them and the person decided (again after every decision)
    const paint = () => {
      tags.replaceChildren();
      rec.cells.forEach((c, i) => {
        const lk = look(f, c, String(i)), r = rects[i];
        r.setAttribute("class", "cell " + lk.cls + (r.classList.contains("focus") ? " focus" : ""));
        r.firstChild.textContent = `object ${i}: ` + (OTHER[c.kind] ? c.kind : c.ood ? "not a cell"
          : c.label == null || c.p_parasitized == null ? "not classified"
          : `${c.label}, ${pText(c)}` + (c.stage && c.p_stage != null ? `, ${c.stage} (p = ${c.p_stage.toFixed(2)})` : ""))
          + (lk.mark ? ` · ${lk.mark}` : "");
        if (lk.cls.startsWith("pos")) {
          tag(c.box, (c.p_parasitized == null ? "✓" : c.p_parasitized.toFixed(2))
            + (lk.stage ? " " + (STAGE_SHORT[lk.stage] || lk.stage) : ""), lk.stage);
        }
      });
      extra.forEach((r) => r.remove());
      extra = additions(f).map((a) => {
        const r = box(a.box, "pos added", a.key);
        r.firstChild.textContent = "added by the reviewer" + (a.stage ? `, ${a.stage}` : "");
        tag(a.box, "+" + (a.stage ? " " + STAGE_SHORT[a.stage] : ""), "added by the reviewer");
        return r;
      });
      v.extra = extra;
    };
    stage.append(img, svg, tags);
    view.append(stage);

    const v = { view, img, rects, extra, stage, paint, zoom: 1, fitted: true, onZoom: null, adding: false };
    paint();
    const fitZoom = () => Math.min(view.clientWidth / W, view.clientHeight / H) || 1;
    const offsetX = (z) => Math.max(0, (view.clientWidth - W * z) / 2);

    // Zoom to z keeping the field point under (ax, ay) (view coordinates; default: the centre) still.
    v.setZoom = (z, ax = view.clientWidth / 2, ay = view.clientHeight / 2) => {
      const f = fitZoom();
      z = Math.max(f, Math.min(MAX_ZOOM, z));
      const ix = (view.scrollLeft + ax - offsetX(v.zoom)) / v.zoom, iy = (view.scrollTop + ay) / v.zoom;
      v.zoom = z;
      v.fitted = z <= f * 1.0001;
      stage.style.width = W * z + "px";
      stage.style.height = H * z + "px";
      view.classList.toggle("zoomed", !v.fitted);
      view.scrollLeft = ix * z + offsetX(z) - ax;
      view.scrollTop = iy * z - ay;
      if (v.onZoom) v.onZoom(v);
    };
    // fitting: drop the zoomed view's scrollbars first, so the fit is measured on the full width
    v.fit = () => { view.classList.remove("zoomed"); v.setZoom(0); };
    v.centerOn = (x, y) => {
      view.scrollLeft = x * v.zoom + offsetX(v.zoom) - view.clientWidth / 2;
      view.scrollTop = y * v.zoom - view.clientHeight / 2;
    };
    v.fitZoom = fitZoom;

    view.addEventListener("wheel", (e) => {
      if (!(e.ctrlKey || e.metaKey)) return; // a plain wheel scrolls (pans) as usual
      e.preventDefault();
      const r = view.getBoundingClientRect();
      v.setZoom(v.zoom * Math.exp(-e.deltaY * 0.0025), e.clientX - r.left, e.clientY - r.top);
    }, { passive: false });
    view.addEventListener("dblclick", (e) => {
      const r = view.getBoundingClientRect();
      v.setZoom(e.shiftKey ? v.zoom / 2 : v.zoom * 2, e.clientX - r.left, e.clientY - r.top);
    });
    view.addEventListener("keydown", (e) => {
      if (e.ctrlKey || e.metaKey || e.altKey) return;
      const act = { "+": () => v.setZoom(v.zoom * STEP), "=": () => v.setZoom(v.zoom * STEP),
        "-": () => v.setZoom(v.zoom / STEP), "0": v.fit, "1": () => v.setZoom(1),
        a: () => setAdding(f, !v.adding), Escape: () => setAdding(f, false) }[e.key];
      if (act) { e.preventDefault(); act(); return; }
      if (f.focusKey != null && reviewKey(e, f, f.focusKey, "field")) e.preventDefault();
    });
    let drag = null, moved = false; // a mouse drags to pan; touch scrolls natively
    // a click (or tap): in "mark a missed cell" mode, adds one there; else selects the cell under it
    view.addEventListener("click", (e) => {
      if (moved) { moved = false; return; }
      const r = stage.getBoundingClientRect();
      const x = ((e.clientX - r.left) * W) / r.width, y = ((e.clientY - r.top) * H) / r.height;
      if (x < 0 || y < 0 || x >= W || y >= H) return;
      if (v.adding) { setAdding(f, false); addMissed(f, x, y); return; }
      const under = [...rects, ...v.extra].filter((rc) => {
        const bx = +rc.getAttribute("x"), by = +rc.getAttribute("y");
        return x >= bx && y >= by && x <= bx + +rc.getAttribute("width") && y <= by + +rc.getAttribute("height")
          && galleryItem(f, rc.dataset.cell);
      });
      if (under.length) {  // the smallest box drawn last is on top: that cell, outlined, its keys in this view
        const key = under[under.length - 1].dataset.cell;
        outline(f, key);
        f.focusKey = key;
        f.back.hidden = false;
        selectItem(galleryItem(f, key), false);
      }
    });
    view.addEventListener("pointerdown", (e) => {
      if (e.pointerType !== "mouse" || e.button !== 0 || v.fitted) return;
      drag = { x: e.clientX, y: e.clientY, l: view.scrollLeft, t: view.scrollTop };
      moved = false;
      view.setPointerCapture(e.pointerId);
      view.classList.add("dragging");
    });
    view.addEventListener("pointermove", (e) => {
      if (!drag) return;
      if (Math.abs(e.clientX - drag.x) + Math.abs(e.clientY - drag.y) > 4) moved = true;
      view.scrollLeft = drag.l - (e.clientX - drag.x);
      view.scrollTop = drag.t - (e.clientY - drag.y);
    });
    const endDrag = () => { drag = null; view.classList.remove("dragging"); };
    view.addEventListener("pointerup", endDrag);
    view.addEventListener("pointercancel", endDrag);
    // a fitted field stays fitted when its view changes size (window resized, tab shown again)
    let lastW = -1;
    new ResizeObserver(() => {
      if (view.clientWidth === lastW) return;
      lastW = view.clientWidth;
      if (v.fitted) v.fit();
    }).observe(view);
    return v;
  }

  // Show the upload; when this browser cannot (TIFF) or shows it in another size, the server's
  // annotated copy without its header band. Resolves to {source, scale}: what to cut gallery
  // crops from, and source pixels per field pixel.
  function loadPicture(f) {
    const { rec, view } = f;
    const img = view.img;
    const fromOverlay = () => new Promise((resolve) => {
      if (!rec.overlay) { resolve(null); return; }
      const ov = new Image();
      ov.onload = () => {
        const s = ov.naturalWidth / rec.width, h = Math.round(rec.height * s);
        const cv = el("canvas");
        cv.width = ov.naturalWidth; cv.height = h;
        cv.getContext("2d").drawImage(ov, 0, ov.naturalHeight - h, cv.width, h, 0, 0, cv.width, h);
        img.src = cv.toDataURL("image/jpeg", 0.92);
        f.card.classList.add("from-overlay");
        const n = el("p", "note", "This browser cannot show this file itself: the picture is the server's annotated copy.");
        f.card.querySelector(".field-tools").after(n);
        resolve({ source: cv, scale: s });
      };
      ov.onerror = () => resolve(null);
      ov.src = rec.overlay;
    });
    return new Promise((resolve) => {
      img.onload = () => {
        // the upload itself, or a stored picture of it (store.py keeps at most 1600 px a side)
        const k = img.naturalWidth / rec.width;
        if (k > 0 && Math.abs(img.naturalHeight / rec.height - k) < 0.01 * k) resolve({ source: img, scale: k });
        else fromOverlay().then(resolve);
      };
      img.onerror = () => fromOverlay().then(resolve);
      img.src = f.url;
    });
  }

  // ---------------------------------------------------------------- cards
  function pendingCard(name) {
    const card = el("article", "field-card pending");
    card.setAttribute("aria-busy", "true");
    const head = el("div", "field-head");
    head.append(el("h3", "field-name", name), el("p", "field-counts", "Waiting…"));
    const bar = el("progress", "field-progress");
    bar.setAttribute("aria-label", `analysing ${name}`);
    card.append(head, bar);
    return card;
  }

  function errorCard(f) {
    const card = el("article", "field-card error");
    const head = el("div", "field-head");
    head.append(el("h3", "field-name", f.name), el("p", "label error", "⚠ Could not analyse this field"));
    card.append(head, el("p", "why", f.rec.error));
    return card;
  }

  function fieldCard(f) {
    const rec = f.rec; // its counts are the server's (the record's n_* keys)
    const card = el("article", "field-card");
    card.id = "field-" + f.id;
    const head = el("div", "field-head");
    head.append(el("h3", "field-name", f.name));
    const dl = el("dl", "field-stats");
    const stat = (k, v, cls) => {
      const d = el("div", cls), dd = el("dd");
      dd.append(...[].concat(v));
      d.append(el("dt", null, k), dd);
      dl.append(d);
    };
    stat("Cells", String(rec.n_cells));
    stat(model.pos, String(rec.n_parasitized), "pos");
    stat("Not a cell", String(rec.n_not_a_cell));
    if (rec.n_unclassified) stat("Not classified", String(rec.n_unclassified));
    stat("Parasitemia", rec.parasitemia == null || !rec.parasitemia_ci95 ? "–"
      : [el("span", null, pc(rec.parasitemia)), " ", el("span", "ci", `(95 % CI ${pcRange(rec.parasitemia_ci95)})`)], "pm");
    head.append(dl);
    card.append(head);
    if (rec.note) card.append(el("p", "field-note", rec.note));

    f.view = fieldView(f);
    const tools = el("div", "field-tools");
    tools.setAttribute("role", "toolbar");
    tools.setAttribute("aria-label", `Zoom ${f.name}`);
    const btn = (text, label, fn, cls) => {
      const b = el("button", "secondary zoom " + (cls || ""), text);
      b.type = "button";
      if (label) b.setAttribute("aria-label", label);
      b.addEventListener("click", fn);
      tools.append(b);
      return b;
    };
    const v = f.view;
    const out = btn("−", "Zoom out", () => v.setZoom(v.zoom / STEP), "z-out");
    const level = el("span", "zoom-level", "fit");
    level.setAttribute("aria-live", "polite");
    tools.append(level);
    const inn = btn("+", "Zoom in", () => v.setZoom(v.zoom * STEP), "z-in");
    btn("Fit", "Fit the whole field", () => v.fit(), "z-fit");
    btn("1:1", "Actual pixels", () => v.setZoom(1), "z-one");
    f.back = btn("↑ Gallery", "Back to the gallery", () => { const g = galleryItem(f, f.focusKey); if (g) g.focus(); }, "back");
    f.back.hidden = true;
    if (rec.field_id) {
      f.mark = btn("Mark a missed cell", null, () => setAdding(f, !f.view.adding), "mark");
      f.mark.setAttribute("aria-pressed", "false");
      f.mark.title = "Then click (or tap) an infected cell the model missed; key A";
    }
    tools.append(el("span", "spacer"));
    if (rec.overlay) {
      const a = el("a", "button-link", "Annotated image");
      a.href = rec.overlay;
      a.download = f.name.replace(/\.[^.]+$/, "") + "-annotated.jpg";
      a.title = "The server's annotated copy of this field (JPEG), with the counts in a header band";
      tools.append(a);
    }
    v.onZoom = () => {
      level.textContent = v.fitted ? `fit (${Math.round(100 * v.zoom)}%)` : `${Math.round(100 * v.zoom)}%`;
      out.disabled = v.fitted;
      inn.disabled = v.zoom >= MAX_ZOOM - 1e-9;
    };
    card.append(tools, v.view);
    return card;
  }

  // ---------------------------------------------------------------- gallery
  // Every cell called parasitized (not "not a cell"), all fields, largest probability first; each
  // a crop cut here from the picture, a button that zooms its field to it.
  function crop(f, c, size) {
    const cv = el("canvas");
    const dpr = window.devicePixelRatio || 1;
    cv.width = cv.height = Math.round(size * dpr);
    const ctx = cv.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, cv.width, cv.height);
    const pic = f.picture;
    if (!pic) return cv;
    const [x0, y0, x1, y1] = c.box;
    const side = Math.max(x1 - x0, y1 - y0) * 1.3, cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
    // source square (field pixels), clipped to the field, then mapped to the canvas
    const sx0 = Math.max(0, cx - side / 2), sy0 = Math.max(0, cy - side / 2);
    const sx1 = Math.min(f.rec.width, cx + side / 2), sy1 = Math.min(f.rec.height, cy + side / 2);
    const k = cv.width / side, s = pic.scale;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(pic.source, sx0 * s, sy0 * s, (sx1 - sx0) * s, (sy1 - sy0) * s,
      (sx0 - (cx - side / 2)) * k, (sy0 - (cy - side / 2)) * k, (sx1 - sx0) * k, (sy1 - sy0) * k);
    return cv;
  }

  // s: the server's pooling of every field on the page (or null). The gallery holds every cell the
  // model called and every cell a person decided on or added; each item a button (key: its cell).
  function renderGallery(s) {
    const picks = [];
    fields.forEach((f) => {
      if (!analysed(f) || !f.view) return;
      f.rec.cells.forEach((c, i) => {
        // the model's calls, and every object a person decided on (a white cell called an infected red cell too)
        if (kind(c) === "pos" || decisionOn(f, String(i))) picks.push({ f, c, key: String(i) });
      });
      additions(f).forEach((a) => picks.push({ f, c: { box: a.box, stage: a.stage, p_parasitized: null }, key: a.key }));
    });
    const p = (c) => (c.p_parasitized == null ? -1 : c.p_parasitized);
    picks.sort((a, b) => p(b.c) - p(a.c));
    const items = picks.map(({ f, c, key }) => {
      const li = el("li");
      const b = el("button", "gallery-item");
      b.type = "button";
      b.dataset.field = f.id;
      b.dataset.cell = key;
      if (c.p_parasitized != null) b.dataset.p = c.p_parasitized;
      const lk = key.startsWith("a") ? { cls: "pos added", stage: c.stage, mark: "+ added by the reviewer" } : look(f, c, key);
      b.className = "gallery-item " + lk.cls;
      const prob = c.p_parasitized == null ? "added" : pText(c);
      const what = `${prob}` + (lk.stage ? `, ${lk.stage}` : "");
      // on the crop itself a short form: the gallery's cards are narrow (phones)
      const shown = (c.p_parasitized == null || c.p_cell_head == null ? prob
        : `p = ${c.p_parasitized.toFixed(3)} · cell head ${c.p_cell_head.toFixed(3)}`) + (lk.stage ? `, ${lk.stage}` : "");
      b.setAttribute("aria-label", `${f.name}, cell ${key}: ${what}${lk.mark ? ", " + lk.mark : ", not reviewed"}.`);
      const where = el("span", "g-where", f.name);
      where.title = f.name;
      b.append(crop(f, c, 104), el("span", "g-p", shown), el("span", "g-mark", lk.mark || "not reviewed"),
        el("span", "g-cell", `cell ${key}`), where);
      b.addEventListener("click", () => showCell(f, key, b));
      b.addEventListener("focus", () => selectItem(b, false));
      li.append(b);
      return li;
    });
    const hadFocus = galleryList.contains(document.activeElement);
    galleryList.replaceChildren(...items);
    const done = fields.some((f) => analysed(f) && f.view);
    gallery.hidden = !done;
    const ok = s && !s.failed;
    q("#gallery-empty").hidden = picks.length > 0;
    q("#gallery-empty").textContent = !ok || s.n_classified
      ? `No cell was called ${model.pos}.`
      : `No cell could be classified, so there is nothing to confirm.`;
    q("#gallery-count").textContent = ok && s.n_parasitized ? `(${s.n_parasitized})` : "";
    const reviewable = fields.some((f) => analysed(f) && f.rec.field_id);
    q("#review-keys").hidden = !reviewable || !picks.length;
    if (!reviewable || !picks.length) q("#review-bar").hidden = true;
    if (selected) {  // the same cell selected again (and focused, when focus was in the gallery)
      const again = galleryItem(fields.find((f) => f.id === selected.field), selected.cell);
      if (again) { selectItem(again, false); if (hadFocus) again.focus({ preventScroll: true }); }
      else q("#review-bar").hidden = true;
    }
  }

  const cellOf = (f, key) => (key.startsWith("a") ? additions(f).find((a) => a.key === key) : f.rec.cells[+key]);

  // outline one cell (in yellow) of every field on the page
  function outline(f, key) {
    fields.forEach((g) => g.view && [...g.view.rects, ...g.view.extra].forEach((r) => r.classList.remove("focus")));
    const r = f.view && [...f.view.rects, ...f.view.extra].find((rc) => rc.dataset.cell === key);
    if (r) r.classList.add("focus");
  }

  function showCell(f, key, from) {
    const v = f.view, c = cellOf(f, key);
    if (!c) return;
    const [x0, y0, x1, y1] = c.box;
    outline(f, key);
    // the cell about a third of the view wide: large enough to judge, with its neighbours around it
    v.setZoom((v.view.clientWidth / 3) / Math.max(x1 - x0, y1 - y0));
    v.centerOn((x0 + x1) / 2, (y0 + y1) / 2);
    f.from = from;
    f.focusKey = key;
    f.back.hidden = false;
    f.card.scrollIntoView({ block: "start" });
    v.view.focus({ preventScroll: true });
    const p = c.p_parasitized == null ? "added by the reviewer" : pText(c);
    status.textContent = `Showing ${f.name}, cell ${key} (${p}), outlined in yellow.`;
  }

  // ---------------------------------------------------------------- review
  let selected = null; // {field, cell}: the gallery item the review bar acts on
  const bar = q("#review-bar");
  const galleryItem = (f, key) => (f && key != null
    ? galleryList.querySelector(`.gallery-item[data-field="${f.id}"][data-cell="${CSS.escape(String(key))}"]`) : null);

  function selectItem(b, focus) {
    if (!b) return;
    const f = fields.find((g) => g.id === +b.dataset.field);
    if (!f || !f.rec.field_id) return;
    selected = { field: f.id, cell: b.dataset.cell };
    galleryList.querySelectorAll(".gallery-item.selected").forEach((g) => g.classList.remove("selected"));
    b.classList.add("selected");
    q("#review-which").textContent = `${f.name}, cell ${b.dataset.cell}: ${b.querySelector(".g-p").textContent} · ` +
      b.querySelector(".g-mark").textContent;
    bar.hidden = false;
    if (focus) { b.focus({ preventScroll: true }); b.scrollIntoView({ block: "nearest" }); }
  }

  const STAGE_KEY = { r: "ring", t: "trophozoite", s: "schizont", g: "gametocyte" };
  // a review key on cell `key` of f: true when it was one; from: as decide's
  function reviewKey(e, f, key, from) {
    if (e.ctrlKey || e.metaKey || e.altKey) return false;
    const k = e.key.toLowerCase();
    const body = k === "y" || k === "c" ? { action: "confirm" } : k === "n" || k === "x" ? { action: "reject" }
      : STAGE_KEY[k] ? { action: "stage", stage: STAGE_KEY[k] }
      : k === "u" || e.key === "Backspace" || e.key === "Delete" ? { action: "clear" } : null;
    if (!body) return false;
    decide(f, key, body, from);
    return true;
  }

  // Decisions go to the server one at a time, in the order they were made (a later answer never
  // overwrites a newer one); the next undecided cell is selected at once, so typing can go on.
  let reviewQueue = Promise.resolve();
  const pending = new Set(); // "field:cell" of decisions on their way

  function whoReviews() {
    const who = reviewerInput.value.trim();
    if (!who) {
      status.textContent = "Type your name in “Reviewer” first: every decision is kept with who made it and when.";
      reviewerInput.focus();
      return null;
    }
    try { localStorage.setItem(REVIEWER_KEY, who); } catch (e) { /* storage off */ }
    return who;
  }

  // from: "gallery" (then on to the next undecided cell), "bar" or "field" (focus stays where it is)
  function decide(f, key, body, from) {
    if (!whoReviews()) return;
    const tag = f.id + ":" + key;
    if (from === "gallery") {
      const items = [...galleryList.querySelectorAll(".gallery-item")];
      const at = items.findIndex((b) => +b.dataset.field === f.id && b.dataset.cell === key);
      const open = (b, k) => k !== at && b.querySelector(".g-mark").textContent === "not reviewed"
        && !pending.has(b.dataset.field + ":" + b.dataset.cell);
      const next = items.find((b, k) => k > at && open(b, k)) || items.find((b, k) => k < at && open(b, k));
      if (next) selectItem(next, true);
    }
    pending.add(tag);
    const gen = generation;
    queueReview(async () => {
      try {
        const answer = await postReview(f, Object.assign({ cell: key }, body), `cell ${key} of ${f.name}`, gen);
        if (!answer) return;
        afterReview(f);
        const still = selected && selected.field === f.id && selected.cell === key;
        // after a tap on the bar, the bar stays on this cell, and focus on it only if it is still in the bar
        if (from === "bar" && still) selectItem(galleryItem(f, key), bar.contains(document.activeElement));
        if (from === "field" && still) selectItem(galleryItem(f, key), false);
      } finally {
        pending.delete(tag);
      }
    });
  }

  // one review request after another; a failure of one never stops the next
  const queueReview = (job) => { reviewQueue = reviewQueue.then(job).catch(() => null); return reviewQueue; };

  function addMissed(f, x, y) {
    if (!whoReviews()) return;
    const gen = generation;
    queueReview(async () => {
      const answer = await postReview(f, { action: "add", x, y }, `the cell marked in ${f.name}`, gen);
      if (!answer) return;
      afterReview(f);
      const d = answer.decision, key = d.action === "add" ? "a" + d.id : d.cell;
      status.textContent = d.action === "add" ? `Added an infected cell at (${Math.round(x)}, ${Math.round(y)}) in ${f.name}.`
        : `Cell ${d.cell} of ${f.name} called ${model.pos} by the reviewer.`;
      outline(f, key);
      f.focusKey = key; // the field's keys (U to undo) act on the cell just marked
      f.back.hidden = false;
      selectItem(galleryItem(f, key), false);
    });
  }

  // "Nothing more to change": every field on the page marked seen (what makes a slide without a call reviewed)
  function markSeen() {
    if (!whoReviews()) return;
    const gen = generation;
    const todo = fields.filter((f) => analysed(f) && f.rec.field_id);
    let done = 0;
    todo.forEach((f) => queueReview(async () => {
      if (await postReview(f, { action: "seen" }, f.name, gen)) { done++; renderReview(); }
    }));
    queueReview(async () => {
      if (gen === generation && done) status.textContent = `${plural(done, "field")} marked as looked at by ${reviewerInput.value.trim()}.`;
    });
  }

  // POST /samples/{id}/reviews; the server's answer, or null (the status line says why)
  let reviewSeq = 0; // answers counted, so that an older GET /review never overwrites a newer decision
  async function postReview(f, body, what, gen) {
    const sample = f.rec.sample || sampleId();
    try {
      const resp = await fetch("/samples/" + encodeURIComponent(sample) + "/reviews", {
        method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify(Object.assign({ field_id: f.rec.field_id, reviewer: reviewerInput.value.trim() }, body)) });
      const answer = await resp.json().catch(() => ({}));
      if (!resp.ok) {
        let detail = answer.detail || resp.statusText;
        if (typeof detail !== "string") detail = (detail[0] && detail[0].msg) || JSON.stringify(detail);
        if (gen === generation) status.textContent = `The decision on ${what} was not kept: ${detail} (HTTP ${resp.status}).`;
        return null;
      }
      if (gen !== generation) return null; // the page was cleared meanwhile: the server kept it, the page moves on
      reviewSeq++;
      decisions[f.rec.field_id] = answer.decisions;
      reviewed = answer;
      return answer;
    } catch (e) {
      if (gen === generation) status.textContent = `The decision on ${what} was not kept: could not reach the server (${e.message}).`;
      return null;
    }
  }

  function afterReview(f) {
    if (f.focusKey != null && !cellOf(f, f.focusKey)) f.focusKey = null; // an added cell withdrawn
    f.view.paint();
    renderGallery(totals);
    renderReview();
  }

  function setAdding(f, on) {
    if (!f.rec.field_id || !f.view) return;
    f.view.adding = on;
    f.view.view.classList.toggle("adding", on);
    if (f.mark) f.mark.setAttribute("aria-pressed", String(on));
    if (on) status.textContent = `Click (or tap) the missed infected cell in ${f.name}; Escape cancels.`;
  }

  // The server's model and reviewed counts of this sample, side by side, and who reviewed.
  function renderReview() {
    const sec = q("#review-summary");
    const on = !!reviewed && fields.some((f) => analysed(f) && f.rec.field_id);
    sec.hidden = !on;
    const who = reviewerInput.value.trim() ? "?operator=" + encodeURIComponent(reviewerInput.value.trim()) : "";
    printLink.hidden = pdfLink.hidden = !fields.some((f) => f.rec && f.rec.field_id);
    printLink.href = samplePath() + "/report.html" + who;
    pdfLink.href = samplePath() + "/report.pdf" + who;
    if (!on) return;
    const r = reviewed.review, m = reviewed.model, v = reviewed.reviewed;
    q("#review-status").textContent = !r.reviewed ? "Not reviewed yet: the counts are the model's."
      : `Reviewed by ${r.reviewers.join(", ")} (last ${r.last.slice(0, 16).replace("T", " ")} UTC): ${r.n_decided} of ${r.n_called} called cells decided · ` +
        `${r.n_confirmed} confirmed, ${r.n_rejected} rejected, ${r.n_restaged} re-staged, ${r.n_added} added.`;
    const pmText = (t) => (t.parasitemia == null ? "–" : `${pc(t.parasitemia)} (${pcRange(t.parasitemia_ci95)})`);
    const stages = (t) => Object.entries(t.n_by_stage || {}).map(([k, n]) => `${n} ${k}`).join(", ") || "–";
    const rows = [["Red cells classified", (t) => t.n_classified], [model.pos, (t) => t.n_parasitized],
      ["Parasitemia (95 % CI)", pmText], ["By stage", stages]];
    q("#review-rows").replaceChildren(...rows.map(([name, fn]) => {
      const tr = el("tr");
      tr.append(el("th", null, name), el("td", null, String(fn(m))), el("td", null, String(fn(v))));
      tr.firstChild.scope = "row";
      return tr;
    }));
  }

  // GET /samples/{id}/review: the server's counts and the decisions in force
  async function refreshReview(gen) {
    if (!fields.some((f) => analysed(f) && f.rec.field_id)) { reviewed = null; renderReview(); return; }
    const seq = reviewSeq;
    try {
      const resp = await fetch(samplePath() + "/review");
      if (!resp.ok || gen !== generation) return;
      const answer = await resp.json();
      if (seq !== reviewSeq) return; // a decision was answered meanwhile: its answer is newer than this one
      decisions = answer.decisions || {};
      reviewed = answer;
    } catch (e) { return; }
    renderReview();
  }

  q("#review-seen").addEventListener("click", markSeen);
  bar.addEventListener("click", (e) => {
    const b = e.target.closest("button");
    if (!b || !selected) return;
    const f = fields.find((g) => g.id === selected.field);
    const body = b.dataset.stage ? { action: "stage", stage: b.dataset.stage } : { action: b.dataset.act };
    decide(f, selected.cell, body, "bar");
  });
  galleryList.addEventListener("keydown", (e) => {
    const b = e.target.closest(".gallery-item");
    if (!b) return;
    const items = [...galleryList.querySelectorAll(".gallery-item")], at = items.indexOf(b);
    const move = { ArrowRight: 1, ArrowDown: 1, j: 1, ArrowLeft: -1, ArrowUp: -1, k: -1 }[e.key];
    if (move) { e.preventDefault(); selectItem(items[Math.max(0, Math.min(items.length - 1, at + move))], true); return; }
    if (e.key === "Home" || e.key === "End") { e.preventDefault(); selectItem(items[e.key === "Home" ? 0 : items.length - 1], true); return; }
    const f = fields.find((g) => g.id === +b.dataset.field);
    if (f && f.rec.field_id && reviewKey(e, f, b.dataset.cell, "gallery")) e.preventDefault();
  });

  // ---------------------------------------------------------------- summary, status, CSV
  let totals = null; // the server's pooling of every field on the page

  // The pooled counts of every field on the page, as the server makes them; then the gallery.
  async function updateSummary(gen) {
    const any = fields.some((f) => f.rec);
    const s = any ? await pooled(fields) : null;
    if (gen !== generation) return;
    totals = s;
    q("#fields-summary").hidden = q("#fields-toolbar").hidden = !any;
    const ok = s && !s.failed, t = ok ? s : {};
    const show = (id, v) => { q(id).textContent = v == null ? "–" : v; };
    q("#f-fields").textContent = ok ? "in " + plural(s.n_analysed, "field") : "";
    show("#f-cells", t.n_cells);
    show("#f-par", t.n_parasitized);
    q("#f-pm").textContent = t.parasitemia == null ? "–" : pc(t.parasitemia);
    q("#f-ci").textContent = t.parasitemia_ci95 ? `95 % CI ${pcRange(t.parasitemia_ci95)}` : ok ? "no cell classified" : "";
    q("#f-classified").textContent = t.n_classified ? `of ${plural(t.n_classified, "classified cell")}` : "";
    show("#f-ood", t.n_not_a_cell);
    show("#f-err", t.n_errors);
    show("#f-wbc", t.n_white_cells);
    q("#f-plt").textContent = t.n_platelets == null ? "" : plural(t.n_platelets, "platelet");
    const stages = Object.entries(t.n_by_stage || {});
    q("#f-stages").textContent = stages.length ? "parasitized by stage: " + stages.map(([k, n]) => `${n} ${k}`).join(", ") : "";
    // the stopping rule, as the server decided it (counting.stopping_rule)
    const st = ok && s.stopping && s.stopping.target_cells ? s.stopping : null;
    q("#fields-stop").textContent = !st ? ""
      : st.reached ? `Stopping rule: ${st.target_cells.toLocaleString("en")} red cells reached.`
      : `Stopping rule: ${(st.target_cells - st.cells_to_go).toLocaleString("en")} of ${st.target_cells.toLocaleString("en")} red cells counted` +
        (st.more_fields == null ? "." : `; about ${plural(st.more_fields, "more field")} like these.`);
    q("#fields-stop-bar").hidden = !st;
    if (st) q("#fields-stop-bar").value = (st.target_cells - st.cells_to_go) / st.target_cells;
    const note = q("#fields-note");
    note.textContent = s && s.failed ? `The server could not pool the fields: ${s.failed}.`
      : ok && s.n_analysed && s.note ? s.note : "";
    note.hidden = !note.textContent;
    q("#fields-legend").hidden = !fields.some((f) => f.view);
    sampleInput.readOnly = fields.length > 0; // one sample on the page: "New sample" starts another
    q("#field-dropzone .dz-main").textContent = fields.length ? `Drop more fields of sample ${sampleId()} here, or choose files`
      : "Drop microscope field images here, or choose files";
    await refreshReview(gen);
    if (gen !== generation) return;
    fields.forEach((f) => f.view && f.view.paint());
    renderGallery(s);
  }

  // the status line: c is the server's pooling of this batch's fields
  async function report(batch, gen) {
    const c = await pooled(batch);
    if (gen !== generation) return;
    if (c.failed) { status.textContent = `Analysed ${plural(batch.length, "file")}; the server could not count them: ${c.failed}.`; return; }
    let msg = c.n_analysed
      ? `Analysed ${plural(c.n_analysed, "field")}: ${plural(c.n_cells, "cell")} found (${c.n_parasitized} ${model.pos}, ${c.n_not_a_cell} not a cell).`
      : "";
    const bad = c.n_errors;
    if (bad) msg += ` ${bad === c.n_fields ? "None of the" : bad + " of the"} ${plural(c.n_fields, "file")} could not be analysed: see the ${bad === 1 ? "card" : "cards"}.`;
    if (totals && !totals.failed && totals.n_fields > c.n_fields) msg += ` ${plural(totals.n_fields, "field")} on the page in all.`;
    status.textContent = msg.trim();
  }

  async function analyse(files, gen) {
    await modelReady.catch(() => null);
    if (!files.length || gen !== generation) return;
    if (!sampleId()) sampleInput.value = newSampleId();
    if (badSampleId(sampleId())) {
      status.textContent = "The sample id cannot hold “/”, “\\” or control characters (e.g. MAL-2024-117 for MAL/2024/117): change it, then drop the fields again.";
      sampleInput.readOnly = false;
      sampleInput.focus();
      return;
    }
    sampleInput.readOnly = true; // these fields are this sample's
    const maxBytes = model.limits.max_field_bytes || 20 * 2 ** 20;
    const batch = files.map((file) => {
      const f = { id: ++uid, file, name: file.name, url: null, rec: null, view: null };
      f.card = pendingCard(f.name);
      list.append(f.card);
      fields.push(f);
      return f;
    });
    progress.hidden = false;
    progress.max = batch.length;
    for (let k = 0; k < batch.length; k++) {
      const f = batch[k];
      progress.value = k;
      status.textContent = `Analysing field ${k + 1} of ${batch.length}: ${f.name}…`;
      f.card.querySelector(".field-counts").textContent = "Analysing…";
      const rec = f.file.size > maxBytes
        ? failed(f.name, `file too large: ${+(f.file.size / 2 ** 20).toFixed(1)} MB (limit ` +
            `${+(maxBytes / 2 ** 20).toFixed(1)} MB per field)`)
        : await smear(f.file);
      if (gen !== generation) return; // cleared meanwhile
      f.rec = rec;
      if (!f.rec.error && !(f.rec.width > 0 && f.rec.height > 0)) f.rec.error = "the server sent no field size";
      let card;
      if (f.rec.error) card = errorCard(f);
      else {
        f.url = URL.createObjectURL(f.file);
        card = fieldCard(f);
      }
      f.card.replaceWith(card);
      f.card = card;
      if (f.view) {
        f.view.fit();
        f.picture = await loadPicture(f);
        if (gen !== generation) return;
      }
      await updateSummary(gen);
      if (gen !== generation) return;
    }
    progress.hidden = true;
    await report(batch, gen);
  }

  const enqueue = (files) => {
    const gen = generation;
    queue = queue.then(() => analyse(files, gen));
    return queue;
  };

  // ---------------------------------------------------------------- wiring
  fileDrop(q("#field-dropzone"), q("#field-input"), enqueue);
  panel.querySelectorAll("button.field-example").forEach((b) => b.addEventListener("click", async () => {
    const src = b.dataset.field;
    try {
      const resp = await fetch(src);
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      const blob = await resp.blob();
      await enqueue([new File([blob], src.split("/").pop(), { type: blob.type || "image/jpeg" })]);
    } catch (e) {
      status.textContent = "Could not load the example: " + e.message;
    }
  }));
  q("#show-boxes").addEventListener("change", (e) => list.classList.toggle("no-boxes", !e.target.checked));
  // Clear the page (what the server keeps stays kept: the Samples tab finds it again)
  function clearPage() {
    generation++;
    progress.hidden = true;
    fields.forEach((f) => { if (f.url && f.url.startsWith("blob:")) URL.revokeObjectURL(f.url); });
    fields.length = 0;
    decisions = {};
    reviewed = null;
    selected = null;
    list.replaceChildren();
  }
  // Clear starts a new sample too: fields dropped after it are another slide's (the cleared one stays
  // on the server, and Samples opens it again)
  q("#fields-clear").addEventListener("click", () => {
    const was = sampleId();
    clearPage();
    sampleInput.value = newSampleId();
    sampleInput.readOnly = false;
    status.textContent = `Cleared from the page; sample ${was} stays kept on the server (Samples opens it again). ` +
      `New fields go to sample ${sampleId()}.`;
    updateSummary(generation);
  });
  q("#new-sample").addEventListener("click", () => {
    clearPage();
    sampleInput.value = newSampleId();
    sampleInput.readOnly = false;
    status.textContent = `New sample ${sampleId()}: type its slide or patient id, then drop its fields.`;
    updateSummary(generation);
    sampleInput.select();
    sampleInput.focus();
  });

  // Show a stored sample (GET /samples/{id}): its fields from their stored pictures, its review; fields
  // dropped then are added to it. Resolves to an error message, or null.
  async function openSample(id) {
    clearPage();
    const gen = generation;
    sampleInput.value = id;
    let rep;
    try {
      const resp = await fetch("/samples/" + encodeURIComponent(id));
      rep = await resp.json().catch(() => ({}));
      if (!resp.ok) return `could not open sample ${id}: ${rep.detail || resp.statusText} (HTTP ${resp.status})`;
    } catch (e) {
      return "could not reach the server (" + e.message + ")";
    }
    if (gen !== generation) return null;
    await modelReady.catch(() => null);
    for (const rec of rep.fields) {
      const f = { id: ++uid, file: null, name: String(rec.image).split(/[\\/]/).pop(), rec, view: null,
        url: `/samples/${encodeURIComponent(id)}/fields/${rec.field_id}/picture` };
      fields.push(f);
      f.card = rec.error ? errorCard(f) : fieldCard(f);
      list.append(f.card);
      if (f.view) {
        f.view.fit();
        f.picture = await loadPicture(f);
        if (!f.picture) {  // a field kept before pictures were (schema 1), or a picture that cannot be shown
          f.view.img.style.visibility = "hidden";
          f.card.querySelector(".field-tools").after(el("p", "note",
            "No picture of this field is kept on the server: its boxes and counts only."));
        }
      }
      if (gen !== generation) return null;
    }
    await updateSummary(gen);
    status.textContent = `Sample ${id}: ${plural(rep.fields.length, "stored field")}. Drop more fields to add them to it.`;
    return null;
  }
  // One row per cell, as `malaria-detect smear --csv` writes it; the columns come from the server
  // (fields.report.CSV_FIELDS, in GET /model's csv_columns).
  const cellValue = {
    image: (f) => f.rec.image, cell: (f, c, i) => i,
    x0: (f, c) => c.box[0], y0: (f, c) => c.box[1], x1: (f, c) => c.box[2], y1: (f, c) => c.box[3],
    label: (f, c) => c.label || "",
    p_parasitized: (f, c) => (c.p_parasitized == null ? "" : c.p_parasitized.toFixed(6)),
    ood: (f, c) => String(!!c.ood), border: (f, c) => String(!!c.border),
    kind: (f, c) => c.kind || "red cell",   // records without kinds hold red cells
    stage: (f, c) => c.stage || "",
    p_stage: (f, c) => (c.p_stage == null ? "" : c.p_stage.toFixed(4)),
    p_cell_head: (f, c) => (c.p_cell_head == null ? "" : c.p_cell_head.toFixed(6)),
  };
  q("#fields-csv").addEventListener("click", () => {
    const cols = csvColumns("fields");
    if (!cols) { status.textContent = "The CSV needs the model record from the server, which is not loaded."; return; }
    downloadCsv("malaria-detect-cells.csv", cols, fields.filter(analysed).flatMap((f) => f.rec.cells.map((c, i) =>
      cols.map((k) => (cellValue[k] ? cellValue[k](f, c, i) : c[k])))));
  });
  modelReady.then(() => panel.querySelectorAll(".pos-name").forEach((s) => { s.textContent = model.pos; }))
    .catch(() => null);

  md.registerMode({ id: "fields", title: panel.dataset.title, panel });
  md.openSample = openSample; // the Samples tab opens a stored sample here
})();
