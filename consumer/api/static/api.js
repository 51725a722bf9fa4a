// The API as the page uses it: the token (kept in this tab's session storage only),
// JSON requests with it as a bearer header, and the live changes stream.

const TOKEN_KEY = "phasewatch.token";

export class Unauthorized extends Error {}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

function headers(extra = {}) {
  const h = { Accept: "application/json", ...extra };
  const t = token();
  if (t) h.Authorization = `Bearer ${t}`;
  return h;
}

async function send(path, init, okStatuses = [200]) {
  const response = await fetch(path, { cache: "no-store", credentials: "omit", ...init });
  if (response.status === 401) throw new Unauthorized("the API token was refused");
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!okStatuses.includes(response.status)) {
    const message = body && typeof body.message === "string" ? body.message : response.statusText;
    throw new ApiError(response.status, message);
  }
  return body;
}

export function getJSON(path, okStatuses) {
  return send(path, { headers: headers() }, okStatuses);
}

export function postJSON(path, body) {
  return send(path, {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(body),
  });
}

// Query string from an object, leaving out empty values.
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== "" && v != null) q.set(k, String(v));
  const s = q.toString();
  return s ? `?${s}` : "";
}

// EventSource cannot send headers: the token goes as ?token= (the service hides it in
// its logs; Referrer-Policy no-referrer keeps it from leaving the page).
export function openStream(path, params = {}) {
  return new EventSource(path + query({ ...params, token: token() }));
}
