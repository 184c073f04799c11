// The gateway's HTTP API as the dashboard uses it: fetch with the stored token, errors
// ({"ok":false,"error":…}) turned into ApiError, and the Server-Sent Events URL.
// Paths are relative to the dashboard's own address, so it also works behind a proxy
// that serves the gateway under a path prefix. Must not: touch the page.

const BASE = new URL("..", import.meta.url); // app files live in <base>/static/
const TOKEN_KEY = "shardq.token";

export class ApiError extends Error {
  constructor(status, text) {
    super(text);
    this.status = status;
  }
}

let unauthorized = () => {};

/** Called with the error text whenever the API answers 401. */
export function onUnauthorized(fn) {
  unauthorized = fn;
}

export function getToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return "";
  }
}

export function setToken(token) {
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    // storage may be disabled; the token then lives only as long as the page
  }
  memoryToken = token;
}

let memoryToken = getToken();

function url(path, query = {}) {
  const u = new URL(path.replace(/^\//, ""), BASE);
  for (const [k, v] of Object.entries(query)) {
    if (v !== undefined && v !== null && v !== "") u.searchParams.set(k, String(v));
  }
  return u;
}

/**
 * One API call. Returns `data` of the envelope (or the whole body with `raw`).
 * Throws ApiError with the server's error text, or with what went wrong on the way.
 */
export async function api(path, { method = "GET", body, query, raw = false, timeout = 8000 } = {}) {
  const headers = { Accept: "application/json" };
  if (memoryToken) headers.Authorization = `Bearer ${memoryToken}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(url(path, query), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(timeout),
      cache: "no-store",
    });
  } catch (err) {
    const why = err && err.name === "TimeoutError" ? `no answer in ${timeout / 1000} s` : "gateway unreachable";
    throw new ApiError(0, `${method} ${path}: ${why}`);
  }
  let json = null;
  try {
    json = await res.json();
  } catch {
    // not JSON (a proxy's error page, say): reported below by status
  }
  if (!res.ok || (json && json.ok === false)) {
    const text = (json && json.error) || `HTTP ${res.status} ${res.statusText}`.trim();
    if (res.status === 401) unauthorized(text);
    throw new ApiError(res.status, text);
  }
  if (json === null) throw new ApiError(res.status, `${method} ${path}: the answer is not JSON`);
  return raw || !("data" in json) ? json : json.data;
}

/** The /events stream (EventSource cannot send headers: the token goes in the query). */
export function eventsUrl() {
  return url("events", { token: memoryToken }).toString();
}

export const queuePath = (queue, rest = "") => `queues/${encodeURIComponent(queue)}${rest}`;
