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

  // ---------------------------------------------------------------- counts (the server's)
  const analysed = (f) => f.rec && !f.rec.error; // answered, without an error
  // a box's colour and the gallery, from the cell's label and flag (the counts are the server's)
  // the display class of an object: white cells and platelets (never classified) in their own style
  const OTHER = { "white cell": "wbc", platelet: "plt", other: "oth" };
  const kind = (c) => OTHER[c.kind] || (c.ood ? "ood" : c.label == null ? "unc" : c.label === model.pos ? "pos" : "neg");

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
        resp = await fetch("/smear?overlay=true", { method: "POST", body: form });
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
  function fieldView(rec, name) {
    const W = rec.width, H = rec.height;
    const view = el("div", "field-view");
    view.tabIndex = 0;
    view.setAttribute("role", "group");
    view.setAttribute("aria-label", `${name}: ${plural(rec.n_cells, "cell")} boxed. ` +
      "Keys: + and − zoom, 0 fits, arrows pan.");
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
    const rects = rec.cells.map((c, i) => {
      const [x0, y0, x1, y1] = c.box;
      const r = document.createElementNS(SVG, "rect");
      r.setAttribute("x", x0); r.setAttribute("y", y0);
      r.setAttribute("width", x1 - x0); r.setAttribute("height", y1 - y0);
      r.setAttribute("class", "cell " + kind(c));
      r.setAttribute("vector-effect", "non-scaling-stroke");
      r.dataset.cell = i;
      const t = document.createElementNS(SVG, "title");
      t.textContent = `object ${i}: ` + (OTHER[c.kind] ? c.kind : c.ood ? "not a cell"
        : c.label == null ? "not classified"
        : `${c.label}, p = ${c.p_parasitized.toFixed(3)}` + (c.stage ? `, ${c.stage} (p = ${c.p_stage.toFixed(2)})` : ""));
      r.append(t);
      svg.append(r);
      if (kind(c) === "pos") {
        const tag = el("span", "tag", c.p_parasitized.toFixed(2) + (c.stage ? " " + (STAGE_SHORT[c.stage] || c.stage) : ""));
        if (c.stage) tag.title = c.stage;
        tag.style.left = (100 * x0) / W + "%";
        tag.style.top = (100 * y0) / H + "%";
        tags.append(tag);
      }
      return r;
    });
    stage.append(img, svg, tags);
    view.append(stage);

    const v = { view, img, rects, zoom: 1, fitted: true, onZoom: null };
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
        "-": () => v.setZoom(v.zoom / STEP), "0": v.fit, "1": () => v.setZoom(1) }[e.key];
      if (act) { e.preventDefault(); act(); }
    });
    let drag = null; // a mouse drags to pan; touch scrolls natively
    view.addEventListener("pointerdown", (e) => {
      if (e.pointerType !== "mouse" || e.button !== 0 || v.fitted) return;
      drag = { x: e.clientX, y: e.clientY, l: view.scrollLeft, t: view.scrollTop };
      view.setPointerCapture(e.pointerId);
      view.classList.add("dragging");
    });
    view.addEventListener("pointermove", (e) => {
      if (!drag) return;
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
        if (img.naturalWidth === rec.width && img.naturalHeight === rec.height) resolve({ source: img, scale: 1 });
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

    f.view = fieldView(rec, f.name);
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
    f.back = btn("↑ Gallery", "Back to the gallery", () => { if (f.from && f.from.isConnected) f.from.focus(); }, "back");
    f.back.hidden = true;
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

  // s: the server's pooling of every field on the page (or null)
  function renderGallery(s) {
    const picks = [];
    fields.forEach((f) => {
      if (!analysed(f) || !f.view) return;
      f.rec.cells.forEach((c, i) => { if (kind(c) === "pos") picks.push({ f, c, i }); });
    });
    picks.sort((a, b) => b.c.p_parasitized - a.c.p_parasitized);
    const items = picks.map(({ f, c, i }) => {
      const li = el("li");
      const b = el("button", "gallery-item");
      b.type = "button";
      b.dataset.p = c.p_parasitized;
      b.dataset.field = f.id;
      b.dataset.cell = i;
      b.setAttribute("aria-label", `${f.name}, cell ${i}: p(${model.pos}) = ${c.p_parasitized.toFixed(3)}. Show it in the field.`);
      const where = el("span", "g-where", f.name);
      where.title = f.name;
      b.append(crop(f, c, 104), el("span", "g-p", `p = ${c.p_parasitized.toFixed(3)}` + (c.stage ? `, ${c.stage}` : "")),
        el("span", "g-cell", `cell ${i}`), where);
      b.addEventListener("click", () => showCell(f, i, b));
      li.append(b);
      return li;
    });
    galleryList.replaceChildren(...items);
    const done = fields.some((f) => analysed(f) && f.view);
    gallery.hidden = !done;
    const ok = s && !s.failed;
    q("#gallery-empty").hidden = picks.length > 0;
    q("#gallery-empty").textContent = !ok || s.n_classified
      ? `No cell was called ${model.pos}.`
      : `No cell could be classified, so there is nothing to confirm.`;
    q("#gallery-count").textContent = ok && s.n_parasitized ? `(${s.n_parasitized})` : "";
  }

  function showCell(f, i, from) {
    const v = f.view, [x0, y0, x1, y1] = f.rec.cells[i].box;
    fields.forEach((g) => g.view && g.view.rects.forEach((r) => r.classList.remove("focus")));
    v.rects[i].classList.add("focus");
    // the cell about a third of the view wide: large enough to judge, with its neighbours around it
    v.setZoom((v.view.clientWidth / 3) / Math.max(x1 - x0, y1 - y0));
    v.centerOn((x0 + x1) / 2, (y0 + y1) / 2);
    f.from = from;
    f.back.hidden = false;
    f.card.scrollIntoView({ block: "start" });
    v.view.focus({ preventScroll: true });
    status.textContent = `Showing ${f.name}, cell ${i} (p = ${f.rec.cells[i].p_parasitized.toFixed(3)}), outlined in yellow.`;
  }

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
  q("#fields-clear").addEventListener("click", () => {
    generation++;
    progress.hidden = true;
    fields.forEach((f) => { if (f.url) URL.revokeObjectURL(f.url); });
    fields.length = 0;
    list.replaceChildren();
    status.textContent = "Cleared.";
    updateSummary(generation);
  });
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
})();
