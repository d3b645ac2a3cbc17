// The TracIn results browser: plain JavaScript, runs from file://, fetches nothing from the network.
// Data: window.REPORT_META (data/meta.js) and chunks data/<series>_<n>.js loaded on demand, each
// calling REPORT_CHUNK(series, n, rows). Review decisions live in localStorage, one key per run.
// Why one file over 300 lines: it is loaded from file:// by a <script> tag (no modules, no bundler), and its views
// (test list, test page, training page, mislabel table, figures, review export) share one small state.
"use strict";
(function () {
  const M = window.REPORT_META;
  const main = document.getElementById("main");
  if (!M) { main.textContent = "data/meta.js is missing: rebuild the report with python -m TracIn.report"; return; }
  const PH = "data:image/svg+xml," + encodeURIComponent(
    '<svg xmlns="http://www.w3.org/2000/svg" width="96" height="96"><rect width="96" height="96" fill="#ddd"/>' +
    '<text x="48" y="52" font-size="11" text-anchor="middle" fill="#777">image missing</text></svg>');
  const PAGE = { test: 60, train: 50, mis: 50 };
  const names = M.class_names;

  // ------------------------------------------------------------ data chunks
  const chunks = {}, waiting = {};
  window.REPORT_CHUNK = function (series, n, rows) {
    const key = series + ":" + n;
    chunks[key] = rows;
    (waiting[key] || []).forEach((f) => f());
    delete waiting[key];
  };
  function load(series, n) {
    const key = series + ":" + n;
    if (chunks[key]) return Promise.resolve(chunks[key]);
    return new Promise((resolve, reject) => {
      const first = !waiting[key];
      (waiting[key] = waiting[key] || []).push(() => resolve(chunks[key]));
      if (!first) return;
      const s = document.createElement("script");
      s.src = "data/" + series + "_" + n + ".js";
      s.onerror = () => reject(new Error("cannot load " + s.src));
      document.head.appendChild(s);
    });
  }
  const testRow = new Map(M.test.idx.map((idx, row) => [idx, row]));
  const trainPos = new Map(M.train_order.map((idx, pos) => [idx, pos]));
  function testRecord(idx) {
    const row = testRow.get(idx);
    if (row === undefined) return Promise.resolve(null);
    return load("test", Math.floor(row / M.test_chunk)).then((rows) => rows[row % M.test_chunk]);
  }
  function trainRecord(idx) {
    const pos = trainPos.get(idx);
    if (pos === undefined) return Promise.resolve(null);
    return load("train", Math.floor(pos / M.train_chunk)).then((rows) => rows[pos % M.train_chunk]);
  }
  function trainRecords(from, to) {
    const need = [];
    for (let c = Math.floor(from / M.train_chunk); c <= Math.floor((to - 1) / M.train_chunk); c++) need.push(load("train", c));
    return Promise.all(need).then(() => {
      const out = [];
      for (let p = from; p < to; p++) out.push(chunks["train:" + Math.floor(p / M.train_chunk)][p % M.train_chunk]);
      return out;
    });
  }

  // ------------------------------------------------------------ helpers
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  function fmt(v, d = 3) {
    if (v === null || v === undefined || v === "") return "–";
    v = Number(v);  // a number or "–", never text from a file
    if (!Number.isFinite(v)) return "–";
    const a = Math.abs(v);
    if (Number.isInteger(v) && a < 1e6) return String(v);
    if (a >= 1e4 || (a !== 0 && a < 1e-3)) return v.toExponential(2);
    return (+v).toFixed(a >= 100 ? Math.min(d, 1) : d);
  }
  const signed = (v) => (v === null ? "–" : (Number(v) > 0 ? "+" : "") + fmt(v));
  function img(split, idx, big) {
    return '<img loading="lazy" alt="' + split + " #" + idx + '" src="thumbs/' + split + "/" + idx + '.jpg"' +
      (big ? ' class="big"' : "") + ">";
  }
  function thumb(split, idx, cap, extra) {
    return '<div class="thumb ' + (extra || "") + '" data-split="' + split + '" data-idx="' + idx + '">' + img(split, idx) +
      '<div class="cap">' + cap + "</div></div>";
  }
  // one capturing error listener instead of inline handlers: a missing thumbnail becomes the placeholder
  document.addEventListener("error", (e) => {
    const t = e.target;
    if (t.tagName === "IMG" && t.src !== PH) { t.src = PH; t.classList.add("missing"); }
  }, true);
  function pager(view, page, total) {
    const pages = Math.max(1, Math.ceil(total / PAGE[view]));
    return '<div class="pager" data-view="' + view + '"><button data-page="' + (page - 1) + '"' + (page <= 0 ? " disabled" : "") +
      '>&larr; previous</button><span>page ' + (page + 1) + " of " + pages + " (" + total + ")</span><button data-page=\"" + (page + 1) +
      '"' + (page >= pages - 1 ? " disabled" : "") + ">next &rarr;</button></div>";
  }

  // ------------------------------------------------------------ review decisions
  const REVIEW_KEY = "tracin-review:" + M.run_id;
  let review = {};
  try { review = JSON.parse(localStorage.getItem(REVIEW_KEY) || "{}"); } catch (e) { review = {}; }
  function saveReview() {
    localStorage.setItem(REVIEW_KEY, JSON.stringify(review));
    const n = Object.keys(review).length;
    document.getElementById("review-count").textContent = n + " review decision" + (n === 1 ? "" : "s");
    document.querySelectorAll(".review").forEach(paintReview);
  }
  function reviewControls(rec) {
    return '<span class="review" data-idx="' + rec.idx + '" data-path="' + esc(rec.path) + '">' +
      '<button type="button" data-d="keep">keep</button><button type="button" data-d="drop">drop</button>' +
      '<select data-d="relabel"><option value="">relabel to…</option>' +
      names.map((c) => '<option value="' + esc(c) + '">' + esc(c) + "</option>").join("") + "</select></span>";
  }
  function paintReview(span) {
    const r = review[span.dataset.idx];
    span.querySelectorAll("button").forEach((b) => b.classList.toggle("on", !!r && r.decision === b.dataset.d));
    span.querySelector("select").value = r && r.decision === "relabel" ? r.new_class : "";
  }
  function setReview(span, decision, newClass) {
    const idx = span.dataset.idx, cur = review[idx];
    if (!decision || (cur && cur.decision === decision && decision !== "relabel")) delete review[idx];
    else review[idx] = { decision: decision, new_class: newClass || "", path: span.dataset.path };
    saveReview();
  }
  function csvCell(s) { s = String(s); return /[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s; }
  window.reviewCsv = function () {
    const rows = ["train_idx,path,decision,new_class"];
    Object.keys(review).map(Number).sort((a, b) => a - b).forEach((i) => {
      const r = review[i];
      rows.push([i, r.path, r.decision, r.new_class].map(csvCell).join(","));
    });
    return rows.join("\n") + "\n";
  };
  document.getElementById("export").addEventListener("click", () => {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([window.reviewCsv()], { type: "text/csv" }));
    a.download = "review.csv";
    document.body.appendChild(a); a.click(); a.remove();
  });
  document.getElementById("clear-review").addEventListener("click", () => {
    if (Object.keys(review).length && window.confirm("Clear every review decision of this run?")) { review = {}; saveReview(); }
  });

  // ------------------------------------------------------------ state and routing
  const state = { test: { cls: "", status: "all", page: 0 }, train: { page: 0 }, mis: { split: "all", page: 0 } };
  let current = { view: "overview", idx: null };
  function route() {
    const m = location.hash.replace(/^#/, "").split("/");
    const view = ["overview", "test", "train", "mis"].includes(m[0]) ? m[0] : "overview";
    const idx = m[1] !== undefined && m[1] !== "" && !isNaN(+m[1]) ? +m[1] : null;
    current = { view: view, idx: idx };
    document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === view));
    render().catch((e) => { main.innerHTML = '<p class="note">' + esc(e.message) + "</p>"; });
  }
  window.addEventListener("hashchange", route);

  function render() {
    if (current.view === "test") return renderTest();
    if (current.view === "train") return renderTrain();
    if (current.view === "mis") return renderMis();
    return Promise.resolve(renderOverview());
  }

  // ------------------------------------------------------------ overview
  function renderOverview() {
    const r = M.run, ev = M.evaluation;
    let h = "<h2>Run</h2><table>" +
      [["training images", r.n_train], ["test images", r.n_test], ["checkpoints", r.n_checkpoints + " (" +
        r.checkpoints.map((c) => "epoch " + c.epoch + ", lr " + fmt(c.lr, 5)).join("; ") + ")"],
       ["model explained", r.model || "–"],
       ["layers", (r.layers || []).join(", ")], ["score of the main lists (--score_fn)", r.score_fn],
       ["normalisation of the main lists", r.normalize],
       ["lists in this report", M.kinds.join(", ") + " (top " + M.show_k + " of " + M.top_k + " shown)"],
       ["factors + scores time", fmt(r.seconds, 1) + " s"], ["data", r.data_dir],
       ["test accuracy", ev ? fmt(ev.accuracy, 4) + " on " + ev.n + " images (" + esc(ev.model) + ")" : "– (no evaluate.py output)"],
       ["model selected on", !ev || !ev.selected_on ? "–" : ev.selected_on === "val" ? "val: accuracy " + fmt(ev.selection_accuracy, 4) +
         " (the test split untouched by the choice)" : "the test split (data without a val split): the test accuracy is optimistic"],
       ["report built", M.built]].map((kv) => '<tr><th class="l">' + kv[0] + '</th><td class="l">' + esc(kv[1]) + "</td></tr>").join("") + "</table>";
    if (M.notes.length) h += "<h3>Missing or skipped</h3>" + M.notes.map((n) => '<div class="note">' + esc(n) + "</div>").join("");
    if (M.mislabel && M.mislabel.metrics) {
      h += "<h2>Mislabel detectors</h2><p class=\"small\">" + fmt(M.mislabel.n_mislabeled, 0) + " injected label errors; default ranking: " +
        esc(M.mislabel.score) + '</p><table id="mislabel-table"><tr><th class="l">detector</th><th>recall@5%</th><th>recall@10%</th><th>recall@20%</th><th>AP</th><th>ROC AUC</th></tr>' +
        Object.entries(M.mislabel.metrics).map(([d, m]) => '<tr><td class="l">' + esc(d) + (d === M.mislabel.score ? " (default)" : "") + "</td><td>" +
          [m.recall_at_5pct, m.recall_at_10pct, m.recall_at_20pct, m.average_precision, m.roc_auc].map((v) => fmt(v)).join("</td><td>") + "</td></tr>").join("") + "</table>";
    }
    for (const [kind, cf] of Object.entries(M.counterfactual)) {
      h += "<h2>Counterfactual check (" + esc(kind) + " retrain)</h2><p class=\"small\">" + fmt(cf.n_group, 0) + " test images; each method's top k " +
        "proponents of them removed, retrained with " + fmt(cf.seeds, 0) + " seeds; change of the group's mean loss against nothing removed (mean ± std).</p>" +
        '<table><tr><th class="l">method</th><th>removed</th><th>Δ loss</th><th>flips</th><th>vs random</th></tr>' +
        Object.entries(cf.summary).map(([m, s]) => '<tr><td class="l">' + esc(m) + "</td><td>" + fmt(s.removed, 0) + "</td><td>" + signed(s.d_loss_mean) +
          " ± " + fmt(s.d_loss_std) + "</td><td>" + fmt(s.d_flips_mean, 1) + "</td><td>" + (m.startsWith("random") ? "" : s.beats_random ? "beats" : "no") + "</td></tr>").join("") + "</table>";
    }
    if (M.lds) {
      h += "<h2>Linear datamodeling score (" + esc(M.lds.retrain) + " retrain)</h2><p class=\"small\">How well each method's scores " +
        "predict the margins of models retrained on " + fmt(M.lds.subsets, 0) + " random halves of the training set (Spearman per test image, " +
        "mean over " + fmt(M.lds.n_test, 0) + " test images, 95% bootstrap interval); the subset models' accuracy " + fmt(M.lds.accuracy, 4) + ".</p>" +
        '<table id="lds-table"><tr><th class="l">method</th><th>LDS</th><th>95% interval</th><th>damping</th></tr>' +
        Object.entries(M.lds.methods).map(([m, v]) => '<tr><td class="l">' + esc(m) + "</td><td>" + fmt(v.lds) + "</td><td>" +
          fmt(v.ci_low) + " – " + fmt(v.ci_high) + "</td><td>" + (v.damping === null ? "" : fmt(v.damping)) + "</td></tr>").join("") + "</table>";
    }
    if (M.figures.length) h += '<h2>Figures</h2><div class="figures">' + M.figures.map((f) => "<h3>" + esc(f.title) + '</h3><img src="' + esc(f.file) + '" alt="' + esc(f.title) + '">').join("") + "</div>";
    main.innerHTML = h;
  }

  // ------------------------------------------------------------ test images
  function filteredTests() {
    const s = state.test, out = [];
    for (let row = 0; row < M.test.idx.length; row++) {
      const y = M.test.label[row], p = M.test.pred[row];
      if (s.cls !== "" && y !== +s.cls) continue;
      if (s.status === "correct" && y !== p) continue;
      if (s.status === "wrong" && y === p) continue;
      out.push(row);
    }
    return out;
  }
  function listBlock(kind, role, idxs, vals) {
    const title = (role === "prop" ? "Proponents" : "Opponents") + " (" + esc(kind) + ")";
    return '<div class="list" data-kind="' + esc(kind) + '" data-role="' + role + '"><h3>' + title + '</h3><div class="grid">' +
      idxs.map((i, j) => thumb("train", i, "#" + i + " " + esc(names[trainClass(i)] ?? "") + '<br><span class="' + (vals[j] >= 0 ? "pos" : "neg") + '">' + fmt(vals[j]) + "</span>")).join("") +
      "</div></div>";
  }
  let trainClassOf = {};
  const trainClass = (i) => trainClassOf[i];
  function renderTest() {
    const s = state.test, rows = filteredTests();
    if (current.idx !== null && testRow.has(current.idx)) {
      const pos = rows.indexOf(testRow.get(current.idx));
      if (pos >= 0) s.page = Math.floor(pos / PAGE.test);
    }
    s.page = Math.min(s.page, Math.max(0, Math.ceil(rows.length / PAGE.test) - 1));
    let h = '<div class="controls"><label>class <select id="f-class"><option value="">all</option>' +
      names.map((c, i) => '<option value="' + i + '"' + (s.cls === String(i) ? " selected" : "") + ">" + esc(c) + "</option>").join("") +
      '</select></label><label>prediction <select id="f-status">' +
      [["all", "all"], ["correct", "correct"], ["wrong", "mispredicted"]].map(([v, t]) => '<option value="' + v + '"' + (s.status === v ? " selected" : "") + ">" + t + "</option>").join("") +
      '</select></label><label>jump to <input id="jump" size="18" placeholder="test index or file name"></label>' +
      '<span class="small" id="test-count">' + rows.length + " of " + M.test.idx.length + ' test images</span><span class="small">keys: ← → (or k j) previous / next</span></div>' +
      '<div id="test-detail"></div>' + pager("test", s.page, rows.length) + '<div class="grid" id="test-grid">' +
      rows.slice(s.page * PAGE.test, (s.page + 1) * PAGE.test).map((row) => {
        const i = M.test.idx[row], wrong = M.test.label[row] !== M.test.pred[row];
        return thumb("test", i, "#" + i + " " + esc(names[M.test.label[row]]) + (wrong ? " → " + esc(names[M.test.pred[row]]) : ""),
          (wrong ? "wrong" : "") + (i === current.idx ? " sel" : ""));
      }).join("") + "</div>";
    main.innerHTML = h;
    document.getElementById("f-class").addEventListener("change", (e) => { s.cls = e.target.value; s.page = 0; renderTest(); });
    document.getElementById("f-status").addEventListener("change", (e) => { s.status = e.target.value; s.page = 0; renderTest(); });
    document.getElementById("jump").addEventListener("keydown", (e) => {
      if (e.key !== "Enter") return;
      const q = e.target.value.trim();
      let row = /^\d+$/.test(q) ? testRow.get(+q) : M.test.file.findIndex((f) => f.includes(q));
      if (row === undefined || row < 0 || q === "") { e.target.value = ""; e.target.placeholder = "not found: " + q; return; }
      location.hash = "#test/" + M.test.idx[row];
    });
    if (current.idx === null) return Promise.resolve();
    return testRecord(current.idx).then((rec) => {
      const box = document.getElementById("test-detail");
      if (!box) return;
      if (!rec) { box.innerHTML = '<div class="note">test image #' + current.idx + " is not in this run</div>"; return; }
      const row = testRow.get(rec.idx), y = M.test.label[row], p = M.test.pred[row];
      const need = new Set();
      Object.values(rec.lists).forEach((l) => l.proponents.concat(l.opponents).forEach((i) => need.add(i)));
      return Promise.all([...need].map((i) => trainRecord(i).then((t) => { if (t) trainClassOf[i] = t.label; }))).then(() => {
        box.innerHTML = '<div class="detail"><div class="head">' + img("test", rec.idx, true) + "<div><h2>test image #" + rec.idx + "</h2><div>" +
          esc(M.test.file[row]) + "</div><div>true class <b>" + esc(names[y]) + "</b>, predicted <b class=\"" + (y === p ? "pos" : "neg") + '">' +
          esc(names[p]) + "</b></div></div></div><div class=\"lists\">" +
          Object.entries(rec.lists).map(([kind, l]) => "<div>" + listBlock(kind, "prop", l.proponents, l.proponent_scores) +
            listBlock(kind, "opp", l.opponents, l.opponent_scores) + "</div>").join("") +
          (M.kinds.length < 2 ? '<div class="note small">only the ' + esc(M.kinds[0]) + " lists: the overview says how to add the other kind</div>" : "") +
          "</div></div>";
      });
    });
  }

  // ------------------------------------------------------------ training images
  function renderTrain() {
    const s = state.train, total = M.train_order.length;
    if (current.idx !== null && trainPos.has(current.idx) && trainPos.get(current.idx) < M.n_candidates) {
      s.page = Math.floor(trainPos.get(current.idx) / PAGE.train);
    }
    s.page = Math.min(s.page, Math.max(0, Math.ceil(total / PAGE.train) - 1));
    const from = s.page * PAGE.train, to = Math.min(total, from + PAGE.train);
    return Promise.all([trainRecords(from, to), current.idx === null ? null : trainRecord(current.idx)]).then(([recs, sel]) => {
      let h = M.n_candidates ? "<h2>Mislabel candidates</h2><p class=\"small\">" + M.n_candidates + " highest-ranked by " + esc(M.default_detector || "the rank column of mislabel_candidates.csv") +
        " (rows 1–" + M.n_candidates + "), then " + (total - M.n_candidates) + " more training images that appear in the shown lists or mispredictions.</p>"
        : '<h2>Training images</h2><div class="note">no mislabel table: python -m TracIn.mislabel_detection ranks the candidates; ' +
          "listed here are the training images that appear in the shown lists or mispredictions</div>";
      h += '<div id="train-detail"></div>' + pager("train", s.page, total) + '<table id="train-table"><tr><th>rank</th><th></th><th>index</th><th class="l">given</th><th class="l">predicted</th>' +
        M.detectors.map((d) => "<th>" + esc(d) + "</th>").join("") + "<th>in proponent lists</th><th>in opponent lists</th>" +
        (recs.some((r) => r.injected !== null) ? "<th>injected error</th>" : "") + '<th class="l">review</th></tr>' +
        recs.map((r) => '<tr class="clickable' + (r.idx === current.idx ? " sel" : "") + '" data-split="train" data-idx="' + r.idx + '"><td>' + (r.rank ?? "–") + "</td><td>" +
          '<img class="row-thumb" width="40" height="40" loading="lazy" alt="" src="thumbs/train/' + r.idx + '.jpg"></td><td>' + r.idx + '</td><td class="l">' + esc(names[r.label]) + '</td><td class="l">' +
          (r.pred === null ? "–" : esc(names[r.pred])) + "</td>" + M.detectors.map((d, j) => "<td>" + fmt(r.scores ? r.scores[j] : null) + "</td>").join("") +
          "<td>" + r.in_proponent_lists + "</td><td>" + r.in_opponent_lists + "</td>" +
          (recs.some((x) => x.injected !== null) ? "<td>" + (r.injected === null ? "–" : r.injected ? "yes" : "no") + "</td>" : "") +
          '<td class="l">' + reviewControls(r) + "</td></tr>").join("") + "</table>";
      main.innerHTML = h;
      if (current.idx !== null) {
        const box = document.getElementById("train-detail");
        box.innerHTML = !sel ? '<div class="note">training image #' + current.idx + " is not in this report</div>" :
          '<div class="detail" id="train-sel"><div class="head">' + img("train", sel.idx, true) + "<div><h2>training image #" + sel.idx + "</h2><div>" + esc(sel.file) +
          "</div><div>given class <b>" + esc(names[sel.label]) + "</b>, predicted <b>" + (sel.pred === null ? "–" : esc(names[sel.pred])) + "</b>" +
          (sel.rank ? ", mislabel rank " + sel.rank : "") + "</div><div>in " + sel.in_proponent_lists + " proponent and " + sel.in_opponent_lists +
          " opponent lists (top " + M.top_k + ")</div><div>" +
          reviewControls(sel) + '</div></div></div><div class="lists"><div class="list" data-role="helps"><h3>Proponent of (it helps these test images most)</h3><div class="grid">' +
          sel.helps_most[0].map((t, j) => thumb("test", t, "#" + t + '<br><span class="pos">' + fmt(sel.helps_most[1][j]) + "</span>")).join("") +
          '</div></div><div class="list" data-role="hurts"><h3>Opponent of (it hurts these most)</h3><div class="grid">' +
          sel.hurts_most[0].map((t, j) => thumb("test", t, "#" + t + '<br><span class="neg">' + fmt(sel.hurts_most[1][j]) + "</span>")).join("") + "</div></div></div></div>";
      }
      document.querySelectorAll(".review").forEach(paintReview);
    });
  }

  // ------------------------------------------------------------ mispredictions
  function renderMis() {
    return load("mis", 0).then((rows) => {
      const s = state.mis;
      const shown = rows.filter((r) => s.split === "all" || r.split === s.split);
      s.page = Math.min(s.page, Math.max(0, Math.ceil(shown.length / PAGE.mis) - 1));
      main.innerHTML = '<h2>Mispredictions</h2><div class="controls"><label>split <select id="f-split">' +
        ["all", "test", "train"].map((v) => '<option value="' + v + '"' + (s.split === v ? " selected" : "") + ">" + v + "</option>").join("") +
        '</select></label><span class="small">training images are judged by their given label, injected noise included</span></div>' +
        (rows.length ? "" : '<div class="note">no mispredictions table (python false_prediction.py)</div>') + pager("mis", s.page, shown.length) +
        '<table id="mis-table"><tr><th class="l">split</th><th></th><th>index</th><th class="l">true</th><th class="l">predicted</th><th>confidence</th><th class="l">Grad-CAM (predicted class)</th></tr>' +
        shown.slice(s.page * PAGE.mis, (s.page + 1) * PAGE.mis).map((r) => '<tr class="clickable" data-split="' + esc(r.split) + '" data-idx="' + fmt(r.idx, 0) + '"><td class="l">' + esc(r.split) +
          '</td><td><img width="48" height="48" loading="lazy" alt="" src="thumbs/' + esc(r.split) + "/" + fmt(r.idx, 0) + '.jpg"></td><td>' + fmt(r.idx, 0) + '</td><td class="l">' + esc(r.true) +
          '</td><td class="l">' + esc(r.pred) + "</td><td>" + fmt(r.confidence) + '</td><td class="l">' +
          (r.cam ? '<img width="64" height="64" loading="lazy" alt="Grad-CAM" src="gradcam/' + esc(r.cam) + '">' : '<span class="small">–</span>') + "</td></tr>").join("") + "</table>";
      document.getElementById("f-split").addEventListener("change", (e) => { s.split = e.target.value; s.page = 0; renderMis(); });
    });
  }

  // ------------------------------------------------------------ events
  main.addEventListener("click", (e) => {
    const btn = e.target.closest("button[data-d]");
    if (btn) { setReview(btn.closest(".review"), btn.dataset.d); return; }
    if (e.target.closest(".review")) return;
    const pg = e.target.closest(".pager button");
    if (pg) { state[pg.parentElement.dataset.view].page = +pg.dataset.page; current.idx = null; render(); return; }
    const t = e.target.closest("[data-idx][data-split]");
    if (t) location.hash = "#" + t.dataset.split + "/" + t.dataset.idx;
  });
  main.addEventListener("change", (e) => {
    if (e.target.matches(".review select")) setReview(e.target.closest(".review"), e.target.value ? "relabel" : "", e.target.value);
  });
  document.addEventListener("keydown", (e) => {
    if (e.target.matches("input, select, textarea")) return;
    const step = { ArrowRight: 1, j: 1, ArrowLeft: -1, k: -1 }[e.key];
    if (!step) return;
    if (current.view === "test") {
      const rows = filteredTests();
      if (!rows.length) return;
      const pos = current.idx === null ? -1 : rows.indexOf(testRow.get(current.idx));
      const next = rows[Math.min(rows.length - 1, Math.max(0, pos < 0 ? 0 : pos + step))];
      location.hash = "#test/" + M.test.idx[next];
    } else if (current.view === "train") {
      const pos = current.idx === null ? -1 : (trainPos.get(current.idx) ?? -1);
      const next = M.train_order[Math.min(M.train_order.length - 1, Math.max(0, pos < 0 ? 0 : pos + step))];
      if (next !== undefined) location.hash = "#train/" + next;
    }
  });
  saveReview();
  route();
})();
