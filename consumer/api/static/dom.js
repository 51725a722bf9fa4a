// DOM helpers. Every value that came from the API enters the page through here, as
// text (Text nodes, textContent): never as markup. Task ids, types and error messages
// come from outside phasewatch and are an XSS vector.

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = String(value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(node, child);
    else node.append(child instanceof Node ? child : String(child));
  }
}

export function replace(node, ...children) {
  node.replaceChildren();
  append(node, children);
}

export const byId = (id) => document.getElementById(id);

// The link to a task's detail view, by its full id (encoded: the id is any string).
export function taskHref(id) {
  return `#/task/${encodeURIComponent(id)}`;
}

export function taskLink(id) {
  return el("a", { href: taskHref(id), class: "task-id" }, id);
}

const KNOWN_PHASES = new Set(["pending", "waiting", "running", "completed", "failed", "cancelled"]);

// A phase as a badge. The class is chosen from the known phases, never built from data.
export function phaseBadge(phase) {
  if (phase === null || phase === undefined) return el("span", { class: "phase phase-none" }, "none");
  const known = KNOWN_PHASES.has(phase) ? phase : "other";
  return el("span", { class: `phase phase-${known}` }, String(phase));
}

// Unix ms (or an ISO string) as a readable UTC time; anything else as it is.
export function time(value) {
  if (typeof value !== "number" && typeof value !== "string") return "";
  const d = new Date(value);
  if (Number.isNaN(d.getTime())) return String(value);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

export function number(value, digits = 0) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "–";
  return value.toLocaleString("en", { maximumFractionDigits: digits });
}
