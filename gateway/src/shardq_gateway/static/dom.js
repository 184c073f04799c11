// Small DOM helpers: building elements, updating lists in place (so a focused button
// survives a refresh), and formatting numbers and times. Must not: call the API.

/** h("button", {type: "button", onclick}, "text", child…) */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

export function setText(node, text) {
  const s = String(text);
  if (node.textContent !== s) node.textContent = s;
}

export function show(node, visible) {
  if (node.hidden === visible) node.hidden = !visible;
}

/**
 * Make `parent`'s children match `items`, reusing the child whose data-key matches.
 * `build(item)` creates a child, `update(child, item)` refreshes it. If a removed child
 * held the focus, the focus moves to the child now at its place (or `fallback`).
 */
export function syncChildren(parent, items, keyOf, build, update, fallback = null) {
  const existing = new Map();
  for (const child of parent.children) existing.set(child.dataset.key, child);
  const focused = document.activeElement;
  let lostFocusAt = -1;
  [...existing.values()].forEach((child, i) => {
    if (lostFocusAt < 0 && child.contains(focused)) lostFocusAt = i;
  });
  let prev = null;
  const kept = [];
  for (const item of items) {
    const key = String(keyOf(item));
    let child = existing.get(key);
    if (child) existing.delete(key);
    else {
      child = build(item);
      child.dataset.key = key;
    }
    update(child, item);
    const want = prev ? prev.nextElementSibling : parent.firstElementChild;
    if (want !== child) parent.insertBefore(child, want);
    prev = child;
    kept.push(child);
  }
  const stolen = [...existing.values()].some((child) => child.contains(focused));
  for (const child of existing.values()) child.remove();
  if (stolen) {
    const next = kept[Math.min(lostFocusAt, kept.length - 1)];
    const target = (next && next.querySelector("button, a, input, select")) || fallback;
    if (target) target.focus();
  }
}

export function num(v) {
  if (v === null || v === undefined) return "–";
  return Number(v).toLocaleString("en-US");
}

export function bytes(n) {
  if (!(n >= 0)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n >= 10 || i === 0 ? n.toFixed(0) : n.toFixed(1)} ${units[i]}`;
}

export function preview(value, max = 80) {
  let s;
  try {
    s = JSON.stringify(value);
  } catch {
    s = String(value);
  }
  if (s === undefined) s = "undefined";
  return s.length > max ? `${s.slice(0, max - 1)}…` : s;
}

export function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function localTime(ms) {
  if (!ms) return "–";
  return new Date(ms).toLocaleString([], {
    weekday: "short", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
}

/** "in 3 h 12 min", "5 s ago" */
export function relative(ms, now = Date.now()) {
  if (!ms) return "";
  const d = Math.round((ms - now) / 1000);
  const a = Math.abs(d);
  let s;
  if (a < 60) s = `${a} s`;
  else if (a < 3600) s = `${Math.floor(a / 60)} min ${a % 60 ? `${a % 60} s` : ""}`.trim();
  else if (a < 86400) s = `${Math.floor(a / 3600)} h ${Math.floor((a % 3600) / 60)} min`;
  else s = `${Math.floor(a / 86400)} d ${Math.floor((a % 86400) / 3600)} h`;
  return d >= 0 ? `in ${s}` : `${s} ago`;
}
