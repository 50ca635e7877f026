// hpcwalk viewer: builds the page from window.HPCWALK (data.js). No server, no fetch: works from file://.
// Per walk: one slider over the walk's positions, one panel per method, provenance text under each
// panel, the CLIP-score curve with the position marked, a lazily loaded thumbnail strip, figures.
(function () {
  "use strict";
  var D = window.HPCWALK;
  var walksEl = document.getElementById("walks");
  if (!D) {
    walksEl.textContent = "data.js did not load: keep index.html, data.js, viewer.js and the image folders together.";
    return;
  }
  // method colours come from hpcwalk/see/colors.py through data.js (one table for report, figures and viewer)
  var METHOD_COLORS = D.colors || {};
  var PALETTE = D.palette && D.palette.length ? D.palette : ["#7f7f7f"];
  var SVGNS = "http://www.w3.org/2000/svg";
  var views = [];
  var active = 0;

  // 1. the page: run header, gaps of a partial run, table of contents, walks, figures
  header();
  gaps();
  D.walks.forEach(function (w, k) { views.push(makeView(w, k)); });
  figures(document.getElementById("figures"), D.figures, "Figures");
  activate(0);
  document.addEventListener("keydown", onKey);

  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (a) {
      if (attrs[a] === true) e.setAttribute(a, "");
      else if (attrs[a] !== false && attrs[a] != null) e.setAttribute(a, attrs[a]);
    });
    [].concat(children == null ? [] : children).forEach(function (c) {
      e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return e;
  }

  function svg(tag, attrs) {
    var e = document.createElementNS(SVGNS, tag);
    Object.keys(attrs || {}).forEach(function (a) { e.setAttribute(a, attrs[a]); });
    return e;
  }

  function pad5(i) { return ("0000" + i).slice(-5); }

  function fmt(v, d) { return v == null ? "n/a" : Number(v).toFixed(d); }

  function header() {
    var r = D.run;
    var parts = ["model " + r.model, r.steps + " steps", "guidance " + r.guidance, r.scheduler,
      r.frames + " frames in " + r.shards + (r.total_shards != null ? " of " + r.total_shards : "") + " shards",
      "job " + r.fingerprint, "hpcwalk " + r.hpcwalk_version];
    if (r.clip_model) parts.push("CLIP " + r.clip_model);
    document.getElementById("run").textContent = r.uri + " — " + parts.join(" · ");
    document.title = "hpcwalk: " + r.uri.split("/").filter(Boolean).pop();
  }

  function gaps() {
    if (!D.missing.length) return;
    var box = document.getElementById("gaps");
    box.hidden = false;
    box.appendChild(el("h2", {}, "Partial run: showing what is committed"));
    box.appendChild(el("ul", {}, D.missing.map(function (m) { return el("li", {}, m); })));
  }

  function figures(parent, list, title) {
    if (!list.length) return;
    if (title) parent.appendChild(el("h2", {}, title));
    var box = el("div", {"class": "figs"});
    list.forEach(function (f) {
      box.appendChild(el("figure", {}, [el("img", {src: f.src, alt: f.title, loading: "lazy"}),
        el("figcaption", {}, f.title)]));
    });
    parent.appendChild(box);
  }

  function activate(k) {
    active = k;
    views.forEach(function (v, j) { v.sec.classList.toggle("active", j === k); });
  }

  function onKey(e) {
    var tag = e.target && e.target.tagName;
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || e.altKey || e.ctrlKey || e.metaKey) return;
    var v = views[active];
    if (!v) return;
    var step = e.shiftKey ? 10 : 1;
    if (e.key === "ArrowRight") v.set(v.pos + step);
    else if (e.key === "ArrowLeft") v.set(v.pos - step);
    else if (e.key === "Home") v.set(0);
    else if (e.key === "End") v.set(v.n - 1);
    else return;
    e.preventDefault();
  }

  // 2. one walk
  function makeView(w, k) {
    var n = w.positions.length;
    var posOf = new Map();
    w.positions.forEach(function (i, p) { posOf.set(i, p); });
    var sec = el("section", {id: "walk-" + k, "class": "walk", tabindex: "0", "data-walk": w.name});
    document.getElementById("toc").appendChild(el("a", {href: "#walk-" + k}, w.name));
    sec.appendChild(el("h2", {}, w.name));
    sec.appendChild(el("p", {"class": "about"}, w.kind + " walk · " + n + " positions · " +
      w.tracks.map(function (t) { return t.label + " (" + t.index.length + " frames)"; }).join(", ")));

    var slider = el("input", {type: "range", "class": "slider", min: 0, max: Math.max(0, n - 1), step: 1, value: 0,
      "aria-label": "position along " + w.name + " (" + w.param_name + ")"});
    var prev = el("button", {type: "button", title: "previous frame (←)"}, "◀");
    var next = el("button", {type: "button", title: "next frame (→)"}, "▶");
    var param = el("span", {"class": "param"});
    sec.appendChild(el("div", {"class": "controls"}, [prev, slider, next, param]));

    var panels = el("div", {"class": "panels"});
    var tracks = w.tracks.map(function (t, j) {
      var row = new Map();
      t.index.forEach(function (i, r) { row.set(i, r); });
      var img = el("img", {alt: w.name + " " + t.label, decoding: "async"});
      var gap = el("div", {"class": "gap", hidden: true}, "missing");
      var frame = el("div", {"class": "frame"}, [img, gap]);
      frame.style.setProperty("--aspect", w.width + " / " + w.height);
      var prov = el("p", {"class": "prov"});
      panels.appendChild(el("figure", {"class": "panel", "data-track": j},
        [el("figcaption", {"class": "label"}, t.label), frame, prov]));
      return {t: t, row: row, img: img, gap: gap, prov: prov};
    });
    sec.appendChild(panels);

    var chart = makeChart(w, tracks);
    sec.appendChild(chart.el);
    var strip = makeStrip(w, posOf, function (p) { view.set(p); });
    sec.appendChild(strip.el);
    figures(sec, w.figures, null);
    walksEl.appendChild(sec);

    var view = {sec: sec, n: n, pos: 0, set: set};
    slider.addEventListener("input", function () { set(+slider.value); });
    prev.addEventListener("click", function () { set(view.pos - 1); });
    next.addEventListener("click", function () { set(view.pos + 1); });
    sec.addEventListener("pointerdown", function () { activate(k); });
    sec.addEventListener("focusin", function () { activate(k); });
    set(0);
    return view;

    function set(p) {
      if (!n) { param.textContent = "no committed frames"; return; }
      p = Math.max(0, Math.min(n - 1, p | 0));
      view.pos = p;
      slider.value = p;
      sec.setAttribute("data-pos", p);
      var i = w.positions[p];
      param.textContent = w.params[p] + "  (" + (p + 1) + "/" + n + ")";
      tracks.forEach(function (v) {
        var r = v.row.get(i);
        if (r === undefined) {
          v.img.removeAttribute("src");
          v.img.hidden = true;
          v.gap.hidden = false;
          v.prov.textContent = v.t.label + " frame " + i + ": not committed in this run";
          return;
        }
        v.img.hidden = false;
        v.gap.hidden = true;
        v.img.src = src(v.t, i);
        v.prov.textContent = provenance(w, v.t, r, p);
      });
      [p + 1, p - 1].forEach(prefetch);
      chart.update(p);
      strip.update(p);
    }

    function prefetch(p) {
      if (p < 0 || p >= n) return;
      tracks.forEach(function (v) {
        if (v.row.has(w.positions[p])) new Image().src = src(v.t, w.positions[p]);
      });
    }
  }

  function src(t, i) { return t.dir + "/" + pad5(i) + "." + t.ext; }

  function scoreLabel(c) { return c + (/_b$/.test(c) ? " (vs end prompt)" : " (vs prompt)"); }

  function provenance(w, t, r, p) {
    var prompt = JSON.stringify(t.prompt[r]) + (t.prompt_b[r] != null ? " → " + JSON.stringify(t.prompt_b[r]) : "");
    var score = w.scores.length
      ? w.scores.map(function (c) { return scoreLabel(c) + " " + fmt(t.scores[c][r], 2); }).join(" · ")
      : "CLIP score: none in this run";
    var lines = [t.frame_id[r],
      "method " + (t.method || w.kind) + " · " + w.params[p],
      "seeds " + t.seeds[r],
      "prompt " + prompt];
    if (t.notes && t.notes[r]) lines.push(t.notes[r]);  // easing, pacing, audio time, input images
    lines.push(score, "latent norm " + fmt(t.latent_norm[r], 4));
    return lines.join("\n");
  }

  // 3. the CLIP-score curve, one line per method and score column, with the position marked
  function trackColors(tracks) {
    var k = 0;
    return tracks.map(function (v) {
      return METHOD_COLORS[v.t.method] || PALETTE[k++ % PALETTE.length];
    });
  }

  function makeChart(w, tracks) {
    var box = el("div", {"class": "chart"});
    if (!w.scores.length) {
      box.appendChild(el("p", {"class": "none"}, "no CLIP scores in this run"));
      return {el: box, update: function () {}};
    }
    var W = 800, H = 170, L = 44, R = 10, T = 10, B = 26, n = w.positions.length;
    var series = [];
    var colors = trackColors(tracks);
    tracks.forEach(function (v, j) {
      w.scores.forEach(function (c, s) {
        var pts = w.positions.map(function (i, p) {
          var r = v.row.get(i);
          var y = r === undefined ? null : v.t.scores[c][r];
          return y == null ? null : [p, y];
        });
        series.push({label: v.t.label + " · " + scoreLabel(c), color: colors[j], dash: s > 0, pts: pts, method: v.t.method});
      });
    });
    var ys = [];
    series.forEach(function (s) { s.pts.forEach(function (q) { if (q) ys.push(q[1]); }); });
    var lo = Math.min.apply(null, ys), hi = Math.max.apply(null, ys);
    if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
    var x = function (p) { return L + (n > 1 ? p / (n - 1) : 0.5) * (W - L - R); };
    var y = function (v) { return T + (1 - (v - lo) / (hi - lo)) * (H - T - B); };
    var g = svg("svg", {viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "CLIP score along " + w.name});
    g.appendChild(svg("rect", {x: L, y: T, width: W - L - R, height: H - T - B, fill: "none", stroke: "#ccc"}));
    [[hi, T + 10], [lo, H - B]].forEach(function (a) {
      var t = svg("text", {x: L - 4, y: a[1], "text-anchor": "end", "font-size": 11, fill: "#555"});
      t.textContent = a[0].toFixed(2);
      g.appendChild(t);
    });
    [[0, "start"], [n - 1, "end"]].forEach(function (a) {
      var t = svg("text", {x: x(a[0]), y: H - 8, "text-anchor": a[1], "font-size": 11, fill: "#555"});
      t.textContent = w.params[a[0]];
      g.appendChild(t);
    });
    var dots = series.map(function (s) {
      var d = "", pen = false;
      s.pts.forEach(function (q) {
        if (!q) { pen = false; return; }
        d += (pen ? "L" : "M") + x(q[0]).toFixed(1) + " " + y(q[1]).toFixed(1);
        pen = true;
      });
      g.appendChild(svg("path", {d: d, fill: "none", stroke: s.color, "stroke-width": 1.6, "data-method": s.method,
        "stroke-dasharray": s.dash ? "5 3" : "none", "vector-effect": "non-scaling-stroke"}));
      var dot = svg("circle", {r: 3.5, fill: s.color, "class": "dot"});
      g.appendChild(dot);
      return dot;
    });
    var marker = svg("line", {"class": "marker", y1: T, y2: H - B, stroke: "#111", "stroke-width": 1});
    g.appendChild(marker);
    box.appendChild(g);
    box.appendChild(el("div", {"class": "legend"}, series.map(function (s) {
      var sw = el("i", {});
      sw.style.background = s.dash ? "repeating-linear-gradient(90deg," + s.color + " 0 5px,transparent 5px 8px)" : s.color;
      return el("span", {}, [sw, s.label]);
    })));
    return {el: box, update: function (p) {
      marker.setAttribute("x1", x(p));
      marker.setAttribute("x2", x(p));
      series.forEach(function (s, k) {
        var q = s.pts[p];
        dots[k].setAttribute("visibility", q ? "visible" : "hidden");
        if (q) { dots[k].setAttribute("cx", x(p)); dots[k].setAttribute("cy", y(q[1])); }
      });
    }};
  }

  // 4. the thumbnail strip: at most a few hundred evenly spaced frames, loaded lazily
  function makeStrip(w, posOf, go) {
    var box = el("div", {"class": "strip", "aria-label": "frames of " + w.name});
    var t = w.tracks[w.strip_track];
    var thumbs = w.strip.map(function (i) {
      var p = posOf.get(i);
      var im = el("img", {loading: "lazy", alt: w.params[p], title: w.params[p],
        src: t.thumbs ? t.thumbs + "/" + pad5(i) + ".jpg" : src(t, i)});
      im.addEventListener("click", function () { go(p); });
      box.appendChild(im);
      return {p: p, im: im};
    });
    var here = null;
    return {el: box, update: function (p) {
      var best = null;
      thumbs.forEach(function (th) { if (th.p <= p) best = th; });
      if (here) here.im.classList.remove("here");
      here = best;
      if (here) here.im.classList.add("here");
    }};
  }
})();
