// The report page's own script, inlined into index.html by _page.py and allowed to run by its
// hash in the page's Content-Security-Policy (computed from this text when the page is drawn).
// It draws the figures from the JSON block, then makes the table sortable and filterable. State
// lives in location.hash (#sort=COL&dir=asc|desc&filter=TEXT), so a view can be linked; tests use
// it to drive the page. #tl-status records what rendered and any blocked load (CSP violation)
// for those tests.
(function () {
  "use strict";
  var status = document.getElementById("tl-status");
  var violations = [], errors = [];
  document.addEventListener("securitypolicyviolation", function (e) {
    violations.push(e.violatedDirective + " " + e.blockedURI);
    status.setAttribute("data-violations", violations.join(" | "));
  });

  // ---- leaderboard: sort and filter --------------------------------------------------------
  var table = document.getElementById("leaderboard");
  var tbody = table.tBodies[0];
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var filterBox = document.getElementById("filter");
  var state = {sort: null, dir: "desc", filter: ""};

  function readHash() {
    var h = location.hash.replace(/^#/, "");
    h.split("&").forEach(function (part) {
      var kv = part.split("=");
      if (kv.length !== 2) return;
      var v = decodeURIComponent(kv[1].replace(/\+/g, " "));
      if (kv[0] === "sort") state.sort = v;
      if (kv[0] === "dir" && (v === "asc" || v === "desc")) state.dir = v;
      if (kv[0] === "filter") state.filter = v;
    });
  }
  function writeHash() {
    var parts = [];
    if (state.sort) parts.push("sort=" + encodeURIComponent(state.sort), "dir=" + state.dir);
    if (state.filter) parts.push("filter=" + encodeURIComponent(state.filter));
    try { history.replaceState(null, "", "#" + parts.join("&")); } catch (e) { /* file: quirks */ }
  }
  function compare(a, b, numeric) {
    if (numeric) return parseFloat(a) - parseFloat(b);
    return a.localeCompare(b, undefined, {numeric: true, sensitivity: "base"});
  }
  // Orders a table body by column i (sign 1: ascending, -1: descending), by each cell's data-v.
  function orderRows(body, i, sign) {
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (ra, rb) {
      var a = ra.cells[i], b = rb.cells[i];
      var va = a.getAttribute("data-v"), vb = b.getAttribute("data-v");
      // Missing values always go last, whichever the direction.
      if (va === "" || vb === "") return (va === "") - (vb === "");
      var numeric = a.getAttribute("data-t") === "n" && b.getAttribute("data-t") === "n";
      return sign * compare(va, vb, numeric);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  function sortRows() {
    var i = heads.findIndex(function (th) { return th.getAttribute("data-col") === state.sort; });
    heads.forEach(function (th) { th.removeAttribute("aria-sort"); });
    if (i < 0) return;
    heads[i].setAttribute("aria-sort", state.dir === "asc" ? "ascending" : "descending");
    orderRows(tbody, i, state.dir === "asc" ? 1 : -1);
  }
  function filterRows() {
    var terms = state.filter.toLowerCase().split(/\s+/).filter(Boolean);
    var shown = 0;
    Array.prototype.forEach.call(tbody.rows, function (r) {
      var text = r.textContent.toLowerCase();
      var ok = terms.every(function (t) { return text.indexOf(t) >= 0; });
      r.hidden = !ok;
      if (ok) shown++;
    });
    document.getElementById("shown").textContent = shown + " of " + tbody.rows.length + " trials";
  }
  heads.forEach(function (th) {
    function activate() {
      var col = th.getAttribute("data-col");
      if (state.sort === col) state.dir = state.dir === "asc" ? "desc" : "asc";
      else { state.sort = col; state.dir = (col === "rank" || col === "trial") ? "asc" : "desc"; }
      sortRows(); writeHash();
    }
    th.addEventListener("click", activate);
    th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); activate(); } });
  });
  filterBox.addEventListener("input", function () { state.filter = filterBox.value; filterRows(); writeHash(); });
  window.addEventListener("hashchange", function () { readHash(); filterBox.value = state.filter; sortRows(); filterRows(); });
  readHash();
  filterBox.value = state.filter;
  sortRows();
  filterRows();
  window.tlsearch = {sortTable: function (col, dir) { state.sort = col; state.dir = dir || "desc"; sortRows(); writeHash(); }};

  // ---- other tables (per-class results): click a header to sort; a link may give the first
  // order as #<table id>.sort=COL&<table id>.dir=asc|desc (read once, on load) --------------------
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (t) {
    var cols = Array.prototype.slice.call(t.tHead.rows[0].cells);
    var first = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      var kv = part.split("=");
      if (kv.length === 2 && kv[0].indexOf(t.id + ".") === 0) first[kv[0].slice(t.id.length + 1)] = decodeURIComponent(kv[1]);
    });
    cols.forEach(function (th, i) {
      function activate(wanted) {
        var dir = wanted || (th.getAttribute("aria-sort") === "descending" ? "ascending" : "descending");
        cols.forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir);
        orderRows(t.tBodies[0], i, dir === "ascending" ? 1 : -1);
      }
      th.addEventListener("click", function () { activate(); });
      th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); activate(); } });
      if (first.sort === th.getAttribute("data-col")) activate(first.dir === "asc" ? "ascending" : "descending");
    });
  });

  // ---- figures -----------------------------------------------------------------------------
  var payload = JSON.parse(document.getElementById("tl-figures").textContent);

  // ---- error gallery: every name goes in as text (textContent), never as markup. A link may
  // choose the trial and the pair: #gallery.trial=N&gallery.pair=TRUE-PRED (read once, on load) --
  var gallery = payload.gallery;
  var grid = document.getElementById("gallery-grid");
  if (gallery && grid) {
    var pick = document.getElementById("gallery-trial");
    var pairsBox = document.getElementById("gallery-pairs");
    var shownBox = document.getElementById("gallery-shown");
    var wanted = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      var kv = part.split("=");
      if (kv.length === 2 && kv[0].indexOf("gallery.") === 0) wanted[kv[0].slice(8)] = decodeURIComponent(kv[1]);
    });
    var cls = function (i) { return String(gallery.classes[i]); };
    var el = function (tag, className, text) {
      var e = document.createElement(tag);
      if (className) e.className = className;
      if (text !== undefined) e.textContent = text;
      return e;
    };
    var current = null, pair = null;
    function drawGrid() {
      while (grid.firstChild) grid.removeChild(grid.firstChild);
      var rows = current.shown.filter(function (r) { return !pair || (r.true === pair[0] && r.pred === pair[1]); });
      rows.forEach(function (r) {
        var img = gallery.images[r.image];
        var fig = el("figure");
        fig.setAttribute("data-true", String(r.true));
        fig.setAttribute("data-pred", String(r.pred));
        var pic = el("img");
        pic.alt = img.name;
        pic.src = img.src;
        fig.appendChild(pic);
        var cap = el("figcaption");
        cap.appendChild(el("div", "true", "true: " + cls(r.true)));
        cap.appendChild(el("div", "pred", "predicted: " + cls(r.pred) + " (" + r.prob.toFixed(2) + ")"));
        cap.appendChild(el("div", "loss", "loss " + (r.loss === null ? "inf" : r.loss.toFixed(2))));
        cap.appendChild(el("div", "fname", img.name));
        fig.appendChild(cap);
        grid.appendChild(fig);
      });
      shownBox.textContent = rows.length + " shown of " + current.wrong + " wrong (" + current.images + " validation images)";
      status.setAttribute("data-gallery", String(rows.length));
    }
    function drawPairs() {
      while (pairsBox.firstChild) pairsBox.removeChild(pairsBox.firstChild);
      var all = el("button", "", "all mistakes");
      all.type = "button";
      all.setAttribute("aria-pressed", pair ? "false" : "true");
      all.addEventListener("click", function () { pair = null; drawPairs(); drawGrid(); });
      pairsBox.appendChild(all);
      current.pairs.forEach(function (p) {
        var b = el("button", "", cls(p.true) + " \u2192 " + cls(p.pred) + " \u00d7" + p.count);
        b.type = "button";
        b.setAttribute("data-pair", p.true + "-" + p.pred);
        b.setAttribute("aria-pressed", pair && pair[0] === p.true && pair[1] === p.pred ? "true" : "false");
        b.addEventListener("click", function () { pair = [p.true, p.pred]; drawPairs(); drawGrid(); });
        pairsBox.appendChild(b);
      });
    }
    function choose(i) { current = gallery.trials[i]; pair = null; drawPairs(); drawGrid(); }
    gallery.trials.forEach(function (t, i) {
      var o = el("option", "", "#" + t.trial + (i === 0 ? " (best kept)" : "") + ": " + t.wrong + " wrong");
      o.value = String(i);
      pick.appendChild(o);
    });
    pick.addEventListener("change", function () { choose(parseInt(pick.value, 10)); });
    var first = Math.max(0, gallery.trials.findIndex(function (t) { return String(t.trial) === wanted.trial; }));
    pick.value = String(first);
    choose(first);
    if (wanted.pair) {
      var tp = wanted.pair.split("-").map(Number);
      if (current.pairs.some(function (p) { return p.true === tp[0] && p.pred === tp[1]; })) { pair = tp; drawPairs(); drawGrid(); }
    }
  }
  var ids = Object.keys(payload.figures);
  var pending = ids.map(function (id) {
    var spec = payload.figures[id];
    try {
      return Plotly.newPlot(id, spec.data, spec.layout, payload.config).catch(function (e) {
        errors.push(id + ": " + e); });
    } catch (e) { errors.push(id + ": " + e); return Promise.resolve(); }
  });
  Promise.all(pending).then(function () {
    var drawn = ids.filter(function (id) { return document.querySelector("#" + id + " .main-svg"); });
    status.setAttribute("data-rendered", String(drawn.length));
    status.setAttribute("data-errors", errors.join(" | "));
    status.setAttribute("data-done", "1");
  });
})();
