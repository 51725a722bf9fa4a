// A small line chart drawn by hand in SVG: one series over a fixed time window.
// Only numbers reach it; labels are set as text.

const SVG = "http://www.w3.org/2000/svg";
const W = 420;
const H = 150;
const PAD = { left: 48, right: 10, top: 10, bottom: 22 };

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// 1, 2, 5 x 10^n at or above value.
function niceCeil(value) {
  if (!(value > 0)) return 1;
  const exp = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 5, 10]) if (m * exp >= value) return m * exp;
  return 10 * exp;
}

function label(value) {
  if (value >= 1000) return `${(value / 1000).toLocaleString("en", { maximumFractionDigits: 1 })}k`;
  return value.toLocaleString("en", { maximumFractionDigits: 2 });
}

// points: [{t: ms, value: number}], oldest first; gaps longer than 1.5 intervals break
// the line. windowMs ends at nowMs.
export function drawChart(container, points, { nowMs, windowMs, intervalMs, unit }) {
  const root = svg("svg", {
    viewBox: `0 0 ${W} ${H}`,
    class: "chart-svg",
    role: "img",
    "aria-label": `${unit} over the last ${Math.round(windowMs / 60000)} minutes`,
  });
  const x0 = PAD.left;
  const x1 = W - PAD.right;
  const y0 = H - PAD.bottom;
  const y1 = PAD.top;
  const start = nowMs - windowMs;
  const max = niceCeil(Math.max(0, ...points.map((p) => p.value)));
  const x = (t) => x0 + ((t - start) / windowMs) * (x1 - x0);
  const y = (v) => y0 - (v / max) * (y0 - y1);

  for (const frac of [0, 0.5, 1]) {
    const v = max * frac;
    root.append(svg("line", { x1: x0, x2: x1, y1: y(v), y2: y(v), class: "grid" }));
    root.append(svg("text", { x: x0 - 6, y: y(v) + 4, class: "axis end" }, label(v)));
  }
  for (const [frac, text] of [[0, "-60 min"], [0.5, "-30 min"], [1, "now"]]) {
    const anchor = frac === 0 ? "start" : frac === 1 ? "end" : "middle";
    root.append(svg("text", { x: x0 + frac * (x1 - x0), y: H - 6, class: `axis ${anchor}` }, text));
  }

  const segments = [];
  let current = [];
  let previous = null;
  for (const p of points) {
    if (p.t < start) continue;
    if (previous !== null && p.t - previous > 1.5 * intervalMs && current.length) {
      segments.push(current);
      current = [];
    }
    current.push(p);
    previous = p.t;
  }
  if (current.length) segments.push(current);
  for (const seg of segments) {
    const coords = seg.map((p) => `${x(p.t).toFixed(1)},${y(p.value).toFixed(1)}`);
    if (seg.length === 1) {
      root.append(svg("circle", { cx: x(seg[0].t), cy: y(seg[0].value), r: 2.5, class: "dot" }));
      continue;
    }
    const first = x(seg[0].t).toFixed(1);
    const last = x(seg[seg.length - 1].t).toFixed(1);
    root.append(svg("path", { d: `M${first},${y0} L${coords.join(" L")} L${last},${y0} Z`, class: "area" }));
    root.append(svg("path", { d: `M${coords.join(" L")}`, class: "line" }));
  }
  if (!points.length) {
    root.append(svg("text", { x: (x0 + x1) / 2, y: (y0 + y1) / 2, class: "axis middle empty" }, "collecting…"));
  }
  const latest = points.length ? points[points.length - 1].value : null;
  root.append(svg("title", {}, latest === null ? `no ${unit} yet` : `${label(latest)} ${unit} in the last interval`));
  container.replaceChildren(root);
}
