// malaria-detect screening page, mode "Samples": the samples this server keeps (GET /samples), searched
// by id and date; each opens in "Whole fields" (its stored fields, its review; fields dropped there are
// added to it) or as its printable report. Needs app.js and fields.js first.
"use strict";
(function () {
  const md = window.malariaDetect;
  const panel = document.getElementById("mode-samples");
  if (!md || !panel || !md.openSample) return;
  const { el, plural } = md;
  const q = (sel) => panel.querySelector(sel);
  const status = q("#samples-status"), table = q("#samples-table"), rows = q("#samples-rows");
  const pc = (x) => (100 * x).toFixed(2) + "%";

  function row(s) {
    const tr = el("tr");
    const id = el("th", null, s.sample);
    id.scope = "row";
    const r = s.review || {};
    const pmOf = (t) => (t.parasitemia == null ? "–" : pc(t.parasitemia));
    const pm = pmOf(s) + (s.reviewed ? ` · reviewed ${pmOf(s.reviewed)}` : "");
    const review = !r.reviewed ? "not reviewed" : `${r.complete ? "reviewed" : `${r.n_decided} of ${r.n_called} decided`} by ${r.reviewers.join(", ")}`;
    // each cell names its column, so that a phone can show a row as a card (style.css)
    const td = (label, text) => { const c = el("td", null, text); c.dataset.label = label; return c; };
    tr.append(id, td("Updated", s.updated.replace("T", " ").slice(0, 16)), td("Fields", String(s.n_fields)),
      td("Red cells", s.n_cells.toLocaleString("en")), td("Parasitemia", pm), td("Review", review));
    const act = el("td", "actions");
    const open = el("button", null, "Open");
    open.type = "button";
    open.setAttribute("aria-label", `Open sample ${s.sample} to review it or add fields`);
    open.addEventListener("click", async () => {
      md.showMode("fields");
      const why = await md.openSample(s.sample);
      if (why) document.getElementById("fields-status").textContent = why;
    });
    const rep = el("a", "button-link secondary", "Report");
    rep.href = "/samples/" + encodeURIComponent(s.sample) + "/report.html";
    rep.target = "_blank";
    rep.rel = "noopener";
    rep.setAttribute("aria-label", `Printable report of sample ${s.sample}`);
    const pdf = el("a", "button-link secondary", "PDF");
    pdf.href = "/samples/" + encodeURIComponent(s.sample) + "/report.pdf";
    pdf.target = "_blank";
    pdf.rel = "noopener";
    pdf.setAttribute("aria-label", `Report of sample ${s.sample} as a PDF`);
    act.append(open, " ", rep, " ", pdf);
    tr.append(act);
    return tr;
  }

  async function load() {
    const params = new URLSearchParams();
    if (q("#samples-q").value.trim()) params.set("search", q("#samples-q").value.trim());
    if (q("#samples-since").value) params.set("since", q("#samples-since").value);
    status.textContent = "Loading…";
    try {
      const resp = await fetch("/samples?" + params);
      const body = await resp.json().catch(() => ({}));
      if (!resp.ok) { status.textContent = `No samples: ${body.detail || resp.statusText} (HTTP ${resp.status}).`; table.hidden = true; return; }
      rows.replaceChildren(...body.samples.map(row));
      table.hidden = !body.samples.length;
      status.textContent = body.samples.length ? `${plural(body.samples.length, "sample")}, most recently updated first.`
        : params.toString() ? "No sample matches." : "No sample analysed yet: whole fields analysed here are kept as samples.";
    } catch (e) {
      status.textContent = "Could not reach the server (" + e.message + ").";
    }
  }

  q("#samples-search").addEventListener("submit", (e) => { e.preventDefault(); load(); });
  md.registerMode({ id: "samples", title: panel.dataset.title, panel, onShow: load });
})();
