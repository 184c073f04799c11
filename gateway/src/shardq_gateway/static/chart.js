// The throughput chart: a few series of (time, value) drawn as an inline SVG, the last
// `span` milliseconds, newest on the right. No library. Must not: fetch anything.

const SVG = "http://www.w3.org/2000/svg";
const W = 640;
const H = 180;
const PAD = { left: 44, right: 8, top: 8, bottom: 22 };

function el(name, attrs = {}) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

/** A round number at or above `v` (1, 2, 5 × 10^n), so the axis reads well. */
export function niceCeil(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

export function formatRate(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (v >= 10000) return `${(v / 1000).toFixed(0)}k`;
  if (v >= 1000) return `${(v / 1000).toFixed(1)}k`;
  if (v >= 100) return v.toFixed(0);
  if (v >= 10) return v.toFixed(1);
  return v.toFixed(v === 0 ? 0 : 2);
}

function axisLabel(v) {
  if (v >= 1000) return `${+(v / 1000).toFixed(1)}k`;
  return String(+v.toFixed(2));
}

export class Chart {
  /** series: [{key, label, cls}] */
  constructor(container, series, span = 5 * 60 * 1000) {
    this.series = series;
    this.span = span;
    this.points = []; // {t, values: {key: number}}
    this.svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "chart-svg" });
    this.title = el("title");
    this.svg.append(this.title);
    this.grid = el("g", { class: "grid" });
    this.lines = new Map(series.map((s) => [s.key, el("polyline", { class: `line ${s.cls}` })]));
    this.areas = new Map(series.map((s) => [s.key, el("polygon", { class: `area ${s.cls}` })]));
    this.svg.append(this.grid, ...this.areas.values(), ...this.lines.values());
    container.replaceChildren(this.svg);
    this.draw();
  }

  add(t, values) {
    this.points.push({ t, values });
    const cut = t - this.span - 5000;
    while (this.points.length && this.points[0].t < cut) this.points.shift();
    this.draw();
  }

  draw() {
    const now = this.points.length ? this.points[this.points.length - 1].t : Date.now();
    let top = 0;
    for (const p of this.points) for (const s of this.series) top = Math.max(top, p.values[s.key] || 0);
    const max = niceCeil(top);
    const x = (t) => PAD.left + ((t - (now - this.span)) / this.span) * (W - PAD.left - PAD.right);
    const y = (v) => H - PAD.bottom - (v / max) * (H - PAD.top - PAD.bottom);
    this.drawGrid(max, y);
    const visible = this.points.filter((p) => p.t >= now - this.span);
    for (const s of this.series) {
      const pts = visible.map((p) => `${x(p.t).toFixed(1)},${y(p.values[s.key] || 0).toFixed(1)}`);
      this.lines.get(s.key).setAttribute("points", pts.join(" "));
      const area = visible.length
        ? [`${x(visible[0].t).toFixed(1)},${y(0)}`, ...pts, `${x(now).toFixed(1)},${y(0)}`]
        : [];
      this.areas.get(s.key).setAttribute("points", area.join(" "));
    }
    const last = this.points[this.points.length - 1];
    const desc = this.series
      .map((s) => `${s.label} ${formatRate(last ? last.values[s.key] : null)} per second`)
      .join(", ");
    this.title.textContent = `Throughput over the last ${this.span / 60000} minutes: ${desc}`;
    this.svg.setAttribute("aria-label", this.title.textContent);
  }

  drawGrid(max, y) {
    const g = [];
    for (const v of [0, max / 2, max]) {
      g.push(el("line", { x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v), class: v ? "rule" : "axis" }));
      const label = el("text", { x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end" });
      label.textContent = axisLabel(v);
      g.push(label);
    }
    const minutes = this.span / 60000;
    for (let m = minutes; m >= 0; m -= 1) {
      const px = PAD.left + ((minutes - m) / minutes) * (W - PAD.left - PAD.right);
      const anchor = m === minutes ? "start" : m === 0 ? "end" : "middle";
      const label = el("text", { x: px, y: H - 6, "text-anchor": anchor });
      label.textContent = m === 0 ? "now" : `−${m} min`;
      g.push(label);
    }
    this.grid.replaceChildren(...g);
  }
}
