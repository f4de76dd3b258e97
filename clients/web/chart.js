// Small SVG charts for the dashboard (no library: nothing to vendor, nothing loaded from elsewhere).

const SVG = "http://www.w3.org/2000/svg";
export const PALETTE = ["#2456c7", "#e8590c", "#2f9e44", "#ae3ec9", "#c92a2a", "#1098ad", "#f08c00", "#5c940d"];

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) if (value !== undefined && value !== null) el.setAttribute(name, String(value));
  for (const child of children) el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return el;
}

/** About `count` round tick values covering [lo, hi]. */
export function ticks(lo, hi, count = 5) {
  if (!(hi > lo)) {
    const pad = Math.abs(lo) > 0 ? Math.abs(lo) * 0.1 : 1;
    [lo, hi] = [lo - pad, hi + pad];
  }
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((m) => m >= raw) || raw;
  // Multiples of the step, rounded to its decimals: no 5.9e-18 where 0 is meant.
  const decimals = Math.max(0, -Math.floor(Math.log10(step)) + 1);
  const out = [];
  for (let k = Math.floor(lo / step); k * step <= hi + step * 1e-9; k += 1) out.push(Number((k * step).toFixed(decimals)));
  if (out[out.length - 1] < hi - step * 1e-9) out.push(Number((out[out.length - 1] + step).toFixed(decimals)));
  return out;
}

function format(v) {
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a >= 100 ? v.toFixed(0) : a >= 1 ? v.toFixed(2).replace(/\.?0+$/, "") : String(Number(v.toPrecision(3)));
}

function legend(items) {
  const el = document.createElement("div");
  el.className = "legend";
  for (const { name, color } of items) {
    const item = document.createElement("span");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = color; // CSSOM, allowed by the page's style-src 'self'
    item.append(swatch, name);
    el.append(item);
  }
  return el;
}

const H = 220;
const M = { left: 46, right: 12, top: 10, bottom: 34 };
let W = 480; // set per chart from its container, so that text is drawn at its CSS size

function sizeTo(container) {
  W = Math.max(280, Math.round(container.clientWidth || 480));
}

function empty(container, text) {
  const p = document.createElement("p");
  p.className = "note";
  p.textContent = text;
  container.append(p);
}

function frame(label, yTicks, yOf, xLabel) {
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label });
  for (const t of yTicks) {
    const y = yOf(t);
    svg.append(s("line", { class: "grid", x1: M.left, x2: W - M.right, y1: y, y2: y }));
    svg.append(s("text", { x: M.left - 6, y: y + 4, "text-anchor": "end" }, format(t)));
  }
  svg.append(s("line", { class: "axis", x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom }));
  svg.append(s("line", { class: "axis", x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom }));
  if (xLabel) svg.append(s("text", { x: (M.left + W - M.right) / 2, y: H - 4, "text-anchor": "middle" }, xLabel));
  return svg;
}

/**
 * A line chart into `container`: series = [{name, points: [[x, y], …]}]; xLabel names the x axis. Each point has a
 * tooltip. Returns the number of points drawn.
 */
export function lineChart(container, { label, series, xLabel, xFormat = format, emptyText = "No data yet." }) {
  const points = series.flatMap((ser) => ser.points);
  container.replaceChildren();
  if (points.length === 0) {
    empty(container, emptyText);
    return 0;
  }
  sizeTo(container);
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const yTicks = ticks(Math.min(...ys), Math.max(...ys));
  const [y0, y1] = [yTicks[0], yTicks[yTicks.length - 1]];
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  const xOf = (x) => M.left + ((x - x0) / (x1 - x0)) * (W - M.left - M.right);
  const yOf = (y) => H - M.bottom - ((y - y0) / (y1 - y0)) * (H - M.top - M.bottom);
  const svg = frame(label, yTicks, yOf, xLabel);
  const integers = xs.every(Number.isInteger); // iterations, run numbers: no tick at 2.5
  for (const t of ticks(x0, x1, 6).filter((t) => t >= x0 && t <= x1 && (!integers || Number.isInteger(t)))) {
    svg.append(s("text", { x: xOf(t), y: H - M.bottom + 14, "text-anchor": "middle" }, xFormat(t)));
  }
  series.forEach((ser, k) => {
    const color = ser.color || PALETTE[k % PALETTE.length];
    const sorted = [...ser.points].sort((a, b) => a[0] - b[0]);
    if (sorted.length > 1) {
      svg.append(s("polyline", { fill: "none", stroke: color, "stroke-width": 2, "data-series": ser.name,
        points: sorted.map(([x, y]) => `${xOf(x).toFixed(1)},${yOf(y).toFixed(1)}`).join(" ") }));
    }
    for (const [x, y] of sorted) {
      svg.append(s("circle", { cx: xOf(x).toFixed(1), cy: yOf(y).toFixed(1), r: 3, fill: color, class: "point" },
        s("title", {}, `${ser.name}: ${xFormat(x)} → ${format(y)}`)));
    }
  });
  container.append(svg, legend(series.map((ser, k) => ({ name: ser.name, color: ser.color || PALETTE[k % PALETTE.length] }))));
  return points.length;
}

/**
 * A stacked bar chart into `container`: buckets = [{label, counts: {kind: n}}], kinds in stacking order.
 * Returns the number of bars with a count.
 */
export function stackedBars(container, { label, buckets, kinds, xLabel }) {
  container.replaceChildren();
  sizeTo(container);
  const totals = buckets.map((b) => kinds.reduce((sum, k) => sum + (b.counts[k] || 0), 0));
  const yTicks = ticks(0, Math.max(1, ...totals));
  const top = yTicks[yTicks.length - 1];
  const yOf = (y) => H - M.bottom - (y / top) * (H - M.top - M.bottom);
  const svg = frame(label, yTicks, yOf, xLabel);
  const slot = (W - M.left - M.right) / Math.max(1, buckets.length);
  const barWidth = Math.max(1, slot * 0.75);
  const labelEvery = Math.ceil(buckets.length / 8);
  let drawn = 0;
  buckets.forEach((b, i) => {
    const x = M.left + i * slot + (slot - barWidth) / 2;
    let base = 0;
    kinds.forEach((kind, k) => {
      const n = b.counts[kind] || 0;
      if (!n) return;
      svg.append(s("rect", { x: x.toFixed(1), width: barWidth.toFixed(1), y: yOf(base + n).toFixed(1),
        height: (yOf(base) - yOf(base + n)).toFixed(1), fill: PALETTE[k % PALETTE.length], class: "bar",
        "data-kind": kind, "data-count": n }, s("title", {}, `${b.label}: ${n} ${kind}`)));
      base += n;
    });
    if (totals[i]) drawn += 1;
    if (i % labelEvery === 0) {
      svg.append(s("text", { x: (x + barWidth / 2).toFixed(1), y: H - M.bottom + 14, "text-anchor": "middle" }, b.short || b.label));
    }
  });
  container.append(svg, legend(kinds.map((name, k) => ({ name, color: PALETTE[k % PALETTE.length] }))));
  return drawn;
}
