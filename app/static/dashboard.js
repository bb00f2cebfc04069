// gzx dashboard: plain JavaScript and hand-drawn SVG, shipped inside the package (no CDN).
// Pages: "/" (workflows), "/workflows/<id>" (progress, trajectories, skills, subjects,
// volunteers, audit), "/workflows/<id>/subjects/<sid>" (history, marks and clusters on the image).
// Data come from the read routes of the query API; the cookie set at /login authorises them.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const OUTCOME = { live: "#8a96a3", contested: "#d1495b" };
const CLASS_COLOURS = ["#2b6cb0", "#e08a1e", "#2f855a", "#805ad5", "#b7791f", "#319795"];

// --- small helpers ------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function svgEl(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, String(value));
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return x.toLocaleString("en");
  return x.toFixed(digits);
}

function tickFmt(v) {
  return Math.abs(v) >= 1000 ? v.toLocaleString("en") : String(+v.toFixed(6));
}

function pct(x) {
  return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%";
}

function pill(status) {
  return el("span", { class: "pill " + status, text: status });
}

function classColour(classes, name) {
  const k = classes.indexOf(name);
  return k < 0 ? OUTCOME.live : CLASS_COLOURS[k % CLASS_COLOURS.length];
}

// P(real) 0 -> red, 0.5 -> yellow, 1 -> green (the ramp of dashboard.css).
function realColour(p) {
  const stops = [[0, [215, 48, 39]], [0.5, [254, 224, 139]], [1, [26, 152, 80]]];
  const x = Math.min(1, Math.max(0, p));
  const [a, b] = x <= 0.5 ? [stops[0], stops[1]] : [stops[1], stops[2]];
  const t = (x - a[0]) / (b[0] - a[0]);
  const c = a[1].map((v, i) => Math.round(v + t * (b[1][i] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

async function api(path) {
  const response = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (response.status === 401) {
    window.location.reload(); // the page answers with the login form
    throw new Error("signed out");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(`${path}: ${response.status} ${body.message || ""}`);
  return body;
}

function card(title, ...children) {
  return el("section", { class: "card" }, el("h2", { text: title }), ...children);
}

function legend(items) {
  const box = el("div", { class: "legend" });
  for (const [colour, label] of items) {
    const swatch = el("i");
    swatch.style.background = colour;
    box.append(el("span", {}, swatch, label));
  }
  return box;
}

// --- plots --------------------------------------------------------------------------------

const PAD = { left: 52, right: 14, top: 10, bottom: 34 };

function ticks(lo, hi, n) {
  if (!(hi > lo)) return [lo];
  const step0 = (hi - lo) / n;
  const mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0) || step0;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9 * step; v += step) out.push(+v.toFixed(10));
  return out;
}

// An empty plot frame with axes; returns the svg and the x/y scales.
function frame(name, opts) {
  const width = opts.width || 560;
  const height = opts.height || 300;
  const svg = svgEl("svg", {
    class: "plot", viewBox: `0 0 ${width} ${height}`, "data-plot": name, role: "img",
    "aria-label": opts.title || name,
  });
  const x0 = PAD.left, x1 = width - PAD.right, y0 = height - PAD.bottom, y1 = PAD.top;
  const sx = (v) => x0 + ((v - opts.xMin) / (opts.xMax - opts.xMin || 1)) * (x1 - x0);
  const sy = (v) => y0 - ((v - opts.yMin) / (opts.yMax - opts.yMin || 1)) * (y0 - y1);
  for (const v of opts.yTicks || ticks(opts.yMin, opts.yMax, 5)) {
    svg.append(svgEl("line", { class: "grid", x1: x0, x2: x1, y1: sy(v), y2: sy(v) }));
    svg.append(svgEl("text", { x: x0 - 6, y: sy(v) + 4, "text-anchor": "end", text: (opts.yFormat || tickFmt)(v) }));
  }
  for (const v of opts.xTicks || ticks(opts.xMin, opts.xMax, 6)) {
    svg.append(svgEl("line", { class: "axis", x1: sx(v), x2: sx(v), y1: y0, y2: y0 + 4 }));
    svg.append(svgEl("text", { x: sx(v), y: y0 + 16, "text-anchor": "middle", text: (opts.xFormat || tickFmt)(v) }));
  }
  svg.append(svgEl("line", { class: "axis", x1: x0, x2: x1, y1: y0, y2: y0 }));
  svg.append(svgEl("line", { class: "axis", x1: x0, x2: x0, y1: y0, y2: y1 }));
  if (opts.xLabel) svg.append(svgEl("text", { x: (x0 + x1) / 2, y: height - 4, "text-anchor": "middle", text: opts.xLabel }));
  if (opts.yLabel) {
    svg.append(svgEl("text", {
      x: 11, y: (y0 + y1) / 2, "text-anchor": "middle", transform: `rotate(-90 11 ${(y0 + y1) / 2})`, text: opts.yLabel,
    }));
  }
  return { svg, sx, sy };
}

function polyline(points, sx, sy, attrs) {
  const d = points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
  return svgEl("polyline", { points: d, fill: "none", ...attrs });
}

function retirementPlot(summary) {
  const buckets = summary.retirement_rate;
  if (!buckets.length) return el("p", { class: "muted", text: "No subject has retired yet." });
  const times = buckets.map((b) => Date.parse(b.start));
  const span = summary.bucket === "day" ? 86400e3 : 3600e3;
  const xMin = times[0], xMax = times[times.length - 1] + span;
  const yMax = Math.max(1, summary.subjects, buckets[buckets.length - 1].cumulative);
  const dateFmt = (v) => {
    const d = new Date(v);
    return summary.bucket === "day" ? d.toISOString().slice(5, 10) : d.toISOString().slice(5, 13).replace("T", " ") + "h";
  };
  const tickTimes = ticks(0, (xMax - xMin) / span, 6).filter(Number.isInteger).map((k) => xMin + k * span);
  const { svg, sx, sy } = frame("retirement", {
    xMin, xMax, yMin: 0, yMax, xTicks: tickTimes, xFormat: dateFmt,
    xLabel: `time (UTC, per ${summary.bucket})`, yLabel: "subjects retired",
  });
  const rateMax = Math.max(...buckets.map((b) => b.retired));
  const barWidth = Math.max(1, sx(xMin + span) - sx(xMin) - 1);
  buckets.forEach((b, i) => {
    const h = (b.retired / rateMax) * (sy(0) - sy(yMax)) * 0.35;
    svg.append(svgEl("rect", {
      class: "bar", x: sx(times[i]), y: sy(0) - h, width: barWidth, height: h, fill: "#c3dafe",
    }, svgEl("title", { text: `${b.start}: ${b.retired} retired` })));
  });
  const points = [[xMin, 0]];
  buckets.forEach((b, i) => points.push([times[i] + span, b.cumulative]));
  svg.append(polyline(points, sx, sy, { stroke: "#2f855a", "stroke-width": 2, class: "series" }));
  if (summary.subjects) {
    svg.append(svgEl("line", {
      x1: sx(xMin), x2: sx(xMax), y1: sy(summary.subjects), y2: sy(summary.subjects),
      stroke: "#8a96a3", "stroke-dasharray": "4 3",
    }));
  }
  svg.setAttribute("data-points", String(buckets.length));
  return el("div", {}, svg, legend([["#2f855a", "retired so far"], ["#c3dafe", `retired per ${summary.bucket} (scaled)`], ["#8a96a3", "all subjects"]]));
}

function trajectoryPlot(data) {
  const items = data.trajectories;
  if (!items.length) return el("p", { class: "muted", text: "No subject has votes yet." });
  const classes = data.classes;
  const shown = data.positive_class;
  const xMax = Math.max(1, ...items.map((t) => t.posterior.length - 1));
  const { svg, sx, sy } = frame("trajectories", {
    xMin: 0, xMax, yMin: 0, yMax: 1,
    xLabel: "votes", yLabel: shown ? `P(${shown})` : "P(final answer)",
  });
  for (const t of items) {
    const k = shown ? classes.indexOf(shown) : classes.indexOf(t.label);
    const colour =
      t.status === "retired" ? classColour(classes, t.retired_label || t.label) : OUTCOME[t.status] || OUTCOME.live;
    const line = polyline(t.posterior.map((p, n) => [n, p[Math.max(0, k)]]), sx, sy, {
      stroke: colour, "stroke-width": 1.4, "stroke-opacity": 0.75, class: "trajectory",
      "data-subject": t.subject_id, "data-status": t.status,
    });
    line.append(svgEl("title", { text: `subject ${t.subject_id}: ${t.status} ${t.retired_label || t.label || ""}` }));
    svg.append(line);
  }
  svg.setAttribute("data-points", String(items.length));
  const keys = classes.map((c) => [classColour(classes, c), `retired as ${c}`]);
  return el("div", {}, svg, legend([...keys, [OUTCOME.contested, "contested"], [OUTCOME.live, "live"]]));
}

function skillPlot(page) {
  const classes = page.classes;
  const items = page.items.filter((v) => v.confusion_diagonal);
  if (classes.length !== 2 || !items.length) {
    return el("p", { class: "muted", text: "The skill scatter needs a binary question and votes." });
  }
  const yes = page.positive_class;
  const no = classes.find((c) => c !== yes);
  const { svg, sx, sy } = frame("skills", {
    xMin: 0, xMax: 1, yMin: 0, yMax: 1, height: 340,
    xLabel: `P("${no}" | ${no})`, yLabel: `P("${yes}" | ${yes})`,
  });
  svg.append(svgEl("line", { class: "grid", x1: sx(0), y1: sy(1), x2: sx(1), y2: sy(0), stroke: "#d9dee4" }));
  const most = Math.max(...items.map((v) => v.votes));
  for (const v of [...items].sort((a, b) => b.votes - a.votes)) {
    const r = 2 + 10 * Math.sqrt(v.votes / most);
    const dot = svgEl("circle", {
      class: "volunteer", cx: sx(v.confusion_diagonal[no]), cy: sy(v.confusion_diagonal[yes]), r,
      fill: v.excluded ? "none" : "#2b6cb0", "fill-opacity": 0.45, stroke: v.excluded ? "#d1495b" : "#1a4971",
      "data-volunteer": v.volunteer_id,
    });
    dot.append(svgEl("title", {
      text: `${v.key}: ${v.votes} votes, ${fmt(v.information_per_vote_bits)} bits/vote${v.excluded ? " (excluded)" : ""}`,
    }));
    svg.append(dot);
  }
  svg.setAttribute("data-points", String(items.length));
  return el("div", {}, svg, el("p", { class: "muted", text:
    "Each circle is a volunteer, sized by votes. Top right: reliable; bottom left: obtuse; the diagonal: random clickers. Red rings are excluded." }));
}

function historyPlot(history) {
  const steps = history.steps;
  if (!steps.length) return el("p", { class: "muted", text: "No question task: no answer history." });
  const classes = history.classes;
  const { svg, sx, sy } = frame("history", {
    xMin: 0, xMax: Math.max(1, steps.length - 1), yMin: 0, yMax: 1, height: 260, xLabel: "votes", yLabel: "posterior",
  });
  classes.forEach((c) => {
    svg.append(polyline(steps.map((s) => [s.votes, s.posterior[c]]), sx, sy, {
      stroke: classColour(classes, c), "stroke-width": 2, class: "series",
    }));
    steps.forEach((s) => {
      if (s.answer === c) {
        svg.append(svgEl("circle", { cx: sx(s.votes), cy: sy(s.posterior[c]), r: 3, fill: classColour(classes, c) },
          svgEl("title", { text: `vote ${s.votes}: volunteer ${s.volunteer_id} said ${s.answer}` })));
      }
    });
  });
  svg.setAttribute("data-points", String(steps.length));
  return el("div", {}, svg, legend(classes.map((c) => [classColour(classes, c), `P(${c})`])));
}

// The subject's image (when its URL loads) or a blank canvas of its size, with every mark
// (thin, dashed) and every cluster (thick, with its P(real)) drawn over it.
function subjectStage(data, frameIndex) {
  const marks = data.marks.filter((m) => m.frame === frameIndex);
  const clusters = data.clusters.filter((c) => (c.frame === null ? 0 : c.frame) === frameIndex);
  const extent = (i) => Math.max(1, ...data.marks.map((m) => m.box[i]), ...data.clusters.map((c) => c.box[i]));
  let width = data.width || Math.ceil(extent(2) * 1.1);
  let height = data.height || Math.ceil(extent(3) * 1.1);
  const svg = svgEl("svg", { class: "overlay", viewBox: `0 0 ${width} ${height}`, "data-plot": "subject" });
  const canvas = svgEl("rect", { class: "canvas", x: 0, y: 0, width, height, fill: "#1b2430" });
  svg.append(canvas);
  const layer = svgEl("g", { class: "drawn" });
  svg.append(layer);
  const pOf = new Map(data.clusters.map((c) => [c.id, c.p_real]));
  const stroke = 1.5; // screen pixels: every shape has a non-scaling stroke
  const unit = Math.max(1, width / 600); // user units per screen pixel, roughly, for text
  for (const m of marks) {
    const p = m.cluster_id !== null ? pOf.get(m.cluster_id) : null;
    const [x1, y1, x2, y2] = m.box;
    const shape = m.kind === "point"
      ? svgEl("circle", { cx: x1, cy: y1, r: 3 * unit })
      : svgEl("rect", { x: x1, y: y1, width: Math.max(0.5, x2 - x1), height: Math.max(0.5, y2 - y1) });
    shape.setAttribute("class", "mark");
    shape.setAttribute("fill", "none");
    shape.setAttribute("stroke", p === null || p === undefined ? "#cbd5e0" : realColour(p));
    shape.setAttribute("stroke-width", String(stroke));
    shape.setAttribute("vector-effect", "non-scaling-stroke");
    shape.setAttribute("stroke-dasharray", "4 3");
    shape.append(svgEl("title", { text: `mark ${m.id} by volunteer ${m.volunteer_id}` + (p != null ? `, cluster P(real) ${fmt(p)}` : ", no cluster") }));
    layer.append(shape);
  }
  for (const c of clusters) {
    const [x1, y1, x2, y2] = c.box;
    const colour = realColour(c.p_real);
    const box = svgEl("rect", {
      class: "cluster", x: x1, y: y1, width: Math.max(0.5, x2 - x1), height: Math.max(0.5, y2 - y1),
      fill: "none", stroke: colour, "stroke-width": 3, "vector-effect": "non-scaling-stroke",
      "data-p-real": c.p_real.toFixed(4),
    }, svgEl("title", { text: `cluster ${c.id}: P(real) ${fmt(c.p_real)}, P(off) ${fmt(c.p_off)}, ${c.n_marks} marks of ${c.n_views} views` }));
    layer.append(box);
    layer.append(svgEl("text", {
      x: x1, y: Math.max(12 * unit, y1 - 3 * unit), fill: colour, "font-size": 13 * unit, "font-weight": 700,
      text: c.p_real.toFixed(2),
    }));
  }
  svg.setAttribute("data-marks", String(marks.length));
  svg.setAttribute("data-clusters", String(clusters.length));
  const note = el("p", { class: "muted", text: "" });
  const location = data.locations[frameIndex] || data.locations[0];
  svg.setAttribute("data-image", "none");
  if (location) {
    note.textContent = "Loading the image…";
    const probe = new Image();
    probe.onload = () => {
      if (!data.width || !data.height) {
        width = probe.naturalWidth; height = probe.naturalHeight;
        svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
      }
      const image = svgEl("image", { href: location.url, x: 0, y: 0, width, height, preserveAspectRatio: "none" });
      svg.insertBefore(image, layer);
      svg.setAttribute("data-image", "loaded");
      note.textContent = `Image: ${location.url}`;
    };
    probe.onerror = () => {
      svg.setAttribute("data-image", "unreachable");
      note.textContent = `The image (${location.url}) did not load: marks drawn on a blank canvas of the subject's size (${fmt(width)} × ${fmt(height)}).`;
    };
    probe.src = location.url;
  } else {
    note.textContent = `No image location stored: marks drawn on a blank canvas (${fmt(width)} × ${fmt(height)}).`;
  }
  return el("div", {}, el("div", { class: "stage" }, svg), note,
    el("div", { class: "legend" }, el("span", { text: "P(real): 0" }), el("span", { class: "ramp" }), el("span", { text: "1" }),
      el("span", { text: "— thick boxes: clusters; dashed: volunteers' marks (coloured by their cluster)" })));
}

// --- pages --------------------------------------------------------------------------------

function setCrumbs(...parts) {
  const nav = document.getElementById("crumbs");
  nav.replaceChildren();
  parts.forEach(([label, href], i) => {
    if (i) nav.append(" / ");
    nav.append(href ? el("a", { href, text: label }) : label);
  });
}

async function workflowsPage(main) {
  setCrumbs(["workflows", null]);
  const workflows = await api("/v1/workflows");
  const rows = workflows.map((w) => el("tr", {},
    el("td", {}, el("a", { href: `/workflows/${w.id}`, text: String(w.id) })),
    el("td", { text: w.name || "" }),
    el("td", { class: "num", text: fmt(w.subjects) }),
    el("td", { class: "num", text: fmt(w.live) }),
    el("td", { class: "num", text: fmt(w.retired) }),
    el("td", { class: "num", text: fmt(w.contested) }),
    el("td", { text: w.configured ? "" : "not configured" })));
  main.replaceChildren(el("h1", { text: "Workflows" }), card("Every workflow gzx knows",
    workflows.length
      ? el("table", { "data-table": "workflows" }, el("tr", {}, ...["id", "name", "subjects", "live", "retired", "contested", ""].map(header)), ...rows)
      : el("p", { class: "muted", text: "No workflow yet: PUT /v1/workflows/<id> configures one." })));
}

const NUMERIC = new Set(["subjects", "live", "retired", "contested", "max P", "views", "votes", "bits / vote", "P(real)", "P(off)", "marks / views"]);

function header(name) {
  return el("th", { text: name, class: NUMERIC.has(name) ? "num" : null });
}

function statBox(value, label) {
  return el("div", { class: "stat" }, el("b", { text: value }), el("span", { text: label }));
}

function subjectsTable(workflowId, classes) {
  const body = el("tbody");
  const more = el("button", { type: "button", text: "more" });
  const status = el("select", { name: "status" }, ...["", "live", "retired", "contested"].map((s) => el("option", { value: s, text: s || "any" })));
  const label = el("select", { name: "label" }, el("option", { value: "", text: "any" }), ...classes.map((c) => el("option", { value: c, text: c })));
  const gold = el("select", { name: "gold" }, el("option", { value: "", text: "any" }), el("option", { value: "true", text: "gold" }), el("option", { value: "false", text: "not gold" }));
  let cursor = null;
  async function load(reset) {
    const query = new URLSearchParams({ limit: "25" });
    if (status.value) query.set("status", status.value);
    if (label.value) query.set("label", label.value);
    if (gold.value) query.set("gold", gold.value);
    if (!reset && cursor) query.set("cursor", cursor);
    const page = await api(`/v1/workflows/${workflowId}/subjects?${query}`);
    if (reset) body.replaceChildren();
    for (const s of page.items) {
      const top = s.posterior ? Math.max(...Object.values(s.posterior)) : null;
      body.append(el("tr", {},
        el("td", {}, el("a", { href: `/workflows/${workflowId}/subjects/${s.subject_id}`, text: String(s.subject_id) })),
        el("td", {}, pill(s.status)),
        el("td", { text: s.label || "" }),
        el("td", { class: "num", text: fmt(top) }),
        el("td", { class: "num", text: fmt(s.views) }),
        el("td", { text: s.reason || "" }),
        el("td", { text: s.gold || (s.is_gold ? "boxes" : "") })));
    }
    cursor = page.next_cursor;
    more.disabled = !cursor;
  }
  const form = el("form", { class: "filters", onsubmit: (e) => { e.preventDefault(); load(true).catch(report); } },
    el("label", {}, "status", status), el("label", {}, "label", label), el("label", {}, "gold", gold),
    el("button", { type: "submit", text: "filter" }));
  more.addEventListener("click", () => load(false).catch(report));
  const table = el("table", { "data-table": "subjects" },
    el("thead", {}, el("tr", {}, ...["subject", "status", "label", "max P", "views", "reason", "gold"].map(header))), body);
  return { node: el("div", {}, form, table, more), load };
}

function volunteersTable(page) {
  const rows = page.items.slice(0, 15).map((v) => el("tr", {},
    el("td", { text: v.key }),
    el("td", { text: v.kind + (v.excluded ? " (excluded)" : "") }),
    el("td", { class: "num", text: fmt(v.votes) }),
    el("td", { class: "num", text: fmt(v.information_per_vote_bits) })));
  return el("table", { "data-table": "volunteers" },
    el("tr", {}, ...["volunteer", "kind", "votes", "bits / vote"].map(header)), ...rows);
}

function auditTable(page) {
  if (!page.items.length) return el("p", { class: "muted", text: "No researcher action recorded yet." });
  return el("table", { "data-table": "audit" },
    el("tr", {}, ...["when", "who", "action", "target", "why"].map(header)),
    ...page.items.map((a) => el("tr", {}, el("td", { text: a.at.replace("T", " ").slice(0, 19) }), el("td", { text: a.who }),
      el("td", { text: a.action }), el("td", { text: a.target }), el("td", { text: a.reason }))));
}

async function workflowPage(main, workflowId) {
  setCrumbs(["workflows", "/"], [`workflow ${workflowId}`, null]);
  const [summary, trajectories, byVotes, byInformation, audit] = await Promise.all([
    api(`/v1/workflows/${workflowId}/summary`),
    api(`/v1/workflows/${workflowId}/trajectories?per_status=40`),
    api(`/v1/workflows/${workflowId}/volunteers?sort=votes&limit=1000`),
    api(`/v1/workflows/${workflowId}/volunteers?sort=information&limit=15`),
    api(`/v1/workflows/${workflowId}/audit?limit=20`),
  ]);
  const subjects = subjectsTable(workflowId, summary.classes);
  const spent = summary.baseline_classifications
    ? `${fmt(summary.classifications)} of ${fmt(summary.baseline_classifications)}`
    : fmt(summary.classifications);
  main.replaceChildren(
    el("h1", { text: `${summary.name || "Workflow"} (${workflowId})` }),
    el("div", { class: "stats", "data-summary": "" },
      statBox(fmt(summary.subjects), "subjects"),
      statBox(fmt(summary.retired), "retired"),
      statBox(fmt(summary.contested), "contested"),
      statBox(fmt(summary.live), "live"),
      statBox(summary.subjects ? pct((summary.retired + summary.contested) / summary.subjects) : "–", "settled"),
      statBox(spent, summary.cap ? `classifications (fixed count: ${summary.cap} each)` : "classifications"),
      statBox(pct(summary.saving), "saved vs fixed count")),
    el("div", { class: "grid" },
      card("Retirement progress", retirementPlot(summary)),
      card("Trajectories (a fixed sample, current skills)", trajectoryPlot(trajectories)),
      card(`Volunteer skills (${fmt(byVotes.total)} volunteers; the ${byVotes.items.length} most active)`, skillPlot(byVotes)),
      card("Most informative volunteers", volunteersTable(byInformation)),
      el("section", { class: "card wide" }, el("h2", { text: "Subjects" }), subjects.node),
      el("section", { class: "card wide" }, el("h2", { text: "Researchers' actions (audit)" }), auditTable(audit))));
  await subjects.load(true);
}

async function subjectPage(main, workflowId, subjectId) {
  setCrumbs(["workflows", "/"], [`workflow ${workflowId}`, `/workflows/${workflowId}`], [`subject ${subjectId}`, null]);
  const [history, drawn] = await Promise.all([
    api(`/v1/workflows/${workflowId}/subjects/${subjectId}/history`),
    api(`/v1/workflows/${workflowId}/subjects/${subjectId}/clusters`),
  ]);
  const last = history.steps.length ? history.steps[history.steps.length - 1].posterior : null;
  const why = [];
  if (history.gold) why.push(`gold: ${history.gold} (gold subjects never retire)`);
  if (history.status === "retired") why.push(`retired (${history.reason}) as ${history.retired_label || "–"}`);
  if (history.status === "contested") why.push(`retired as ${history.retired_label}, but the current answer is ${history.label}: waiting for a researcher`);
  if (history.status === "live") why.push("live: not settled yet");
  if (drawn.marks_risk) why.push(`marks risk ${fmt(drawn.marks_risk.risk)} (false kept ${fmt(drawn.marks_risk.e_false_kept)}, missed ${fmt(drawn.marks_risk.e_missed)}, badly placed ${fmt(drawn.marks_risk.e_badly_placed)})`);
  const frames = [...new Set([0, ...drawn.marks.map((m) => m.frame)])].sort((a, b) => a - b);
  const stageBox = el("div", {}, subjectStage(drawn, frames[0]));
  const frameSelect = frames.length > 1
    ? el("label", {}, "frame ", el("select", { onchange: (e) => stageBox.replaceChildren(subjectStage(drawn, Number(e.target.value))) },
        ...frames.map((f) => el("option", { value: String(f), text: String(f) }))))
    : null;
  const clusterRows = drawn.clusters.map((c) => el("tr", {},
    el("td", { text: String(c.id) }), el("td", { text: c.tool_label || String(c.tool) }),
    el("td", { class: "num", text: fmt(c.p_real) }), el("td", { class: "num", text: fmt(c.p_off) }),
    el("td", { class: "num", text: `${c.n_marks} / ${c.n_views}` }), el("td", { text: c.kept ? "kept" : "" }),
    el("td", { text: c.box.map((v) => v.toFixed(1)).join(", ") })));
  main.replaceChildren(
    el("h1", {}, `Subject ${subjectId} `, pill(history.status)),
    el("div", { class: "stats" },
      statBox(history.label || "–", "most probable answer"),
      statBox(last && history.label ? fmt(last[history.label]) : "–", "its posterior"),
      statBox(fmt(Math.max(0, history.steps.length - 1)), "votes counted"),
      statBox(fmt(drawn.clusters.length), "clusters"),
      statBox(fmt(drawn.marks.length), "marks")),
    el("div", { class: "subject-grid" },
      el("section", { class: "card" }, el("h2", { text: "Marks and clusters" }), frameSelect, stageBox),
      el("div", { class: "column" },
        card("Why it stands where it does", el("ul", {}, ...why.map((w) => el("li", { text: w })))),
        card("Posterior after each vote", historyPlot(history)))),
    el("div", { class: "grid" },
      el("section", { class: "card wide" }, el("h2", { text: "Clusters" }),
        clusterRows.length
          ? el("table", { "data-table": "clusters" }, el("tr", {}, ...["id", "tool", "P(real)", "P(off)", "marks / views", "", "box x1, y1, x2, y2"].map(header)), ...clusterRows)
          : el("p", { class: "muted", text: "No cluster." }))));
}

function report(error) {
  console.warn(error);
  const main = document.getElementById("main");
  main.prepend(el("p", { class: "error", text: String(error.message || error) }));
}

async function route() {
  const main = document.getElementById("main");
  const path = window.location.pathname.replace(/\/+$/, "") || "/";
  let m;
  if ((m = path.match(/^\/workflows\/(\d+)\/subjects\/(\d+)$/))) await subjectPage(main, m[1], m[2]);
  else if ((m = path.match(/^\/workflows\/(\d+)$/))) await workflowPage(main, m[1]);
  else await workflowsPage(main);
}

route()
  .then(() => { document.body.dataset.ready = "yes"; })
  .catch((error) => { report(error); document.body.dataset.ready = "error"; });
