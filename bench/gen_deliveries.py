"""Generate N distinct, realistic signed Livepeer webhook deliveries for benchmarking.

The messy fixture's deliveries (``shared/fixtures/messy/deliveries.jsonl``: heavy
reordering, duplicates and resends of ~500 task lifecycles) are the template. The
output is the template repeated ("copies") until N deliveries exist. In each copy:

* every id-like value (event ``id``, task ``id`` / ``payload.task.id`` /
  ``snapshot.id``, ``inputAssetId`` / ``outputAssetId`` / ``assetSpec.id``) is replaced
  by a fresh id, consistently within the copy: each copy is a new set of tasks with the
  same realistic event sequences, and a duplicate or resend in the template (same event
  id, new ``timestamp`` and signature) stays a duplicate or resend of the same new event;
* every millisecond time (``createdAt``, ``updatedAt``, ``scheduledAt``, ``timestamp``,
  ``clipStrategy.startTime``/``endTime``, ...) is shifted by ``copy * period`` so copies
  follow each other in time (``--base-time-ms`` moves the whole stream);
* the body is re-serialized as compact JSON (byte-identical to the template when
  nothing changes) and re-signed: ``Livepeer-Signature: t=<timestamp>,v1=<hex>`` with
  HMAC-SHA256(secret, raw body bytes), ``t`` equal to the body's ``timestamp``.

Output formats:

* ``--jsonl PATH``: the fixtures' format, one ``{"signature": ..., "body": ...}`` a line;
* ``--tsv PATH``: ``<signature>\\t<body>\\n`` a line, for ``bench/wrk_replay.lua`` (wrk's
  Lua has no JSON parser). Compact JSON never contains a raw tab or newline (they are
  escaped inside strings), which the generator also asserts.

A ``<path>.meta.json`` sidecar records the parameters and counts (distinct event ids,
tasks, event types). Output is deterministic given ``--seed`` and the other options.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import hmac
import itertools
import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TEMPLATE = REPO.parent / "shared" / "fixtures" / "messy" / "deliveries.jsonl"
DEFAULT_N = 200_000
DEFAULT_SECRET = "whsec_bench"
DEFAULT_SEED = 1

# Keys whose string value is an opaque id that identifies a task, an event or an asset.
ID_KEYS = frozenset({"id", "inputAssetId", "outputAssetId"})
# Integer values at these keys (or keys ending in "At") are Unix-millisecond times.
TIME_KEYS = frozenset({"timestamp", "startTime", "endTime"})
MIN_MS_TIME = 10**12  # 2001-09-09: anything smaller is not a ms timestamp
COPY_GAP_MS = 60_000  # quiet minute between two copies of the template
_HEX = "0123456789abcdef"

JSON = Any


@dataclass(frozen=True)
class Template:
    bodies: list[JSON]
    min_ms: int
    max_ms: int

    @property
    def period_ms(self) -> int:
        return self.max_ms - self.min_ms + COPY_GAP_MS


@dataclass(frozen=True)
class Params:
    """Everything that determines the generated deliveries (besides the template)."""

    n: int = DEFAULT_N
    secret: str = DEFAULT_SECRET
    seed: int = DEFAULT_SEED
    base_time_ms: int | None = None

    def base_shift_ms(self, template: Template) -> int:
        return 0 if self.base_time_ms is None else self.base_time_ms - template.min_ms


@dataclass
class Stats:
    deliveries: int = 0
    copies: int = 0
    event_ids: set[str] = field(default_factory=set)
    task_ids: set[str] = field(default_factory=set)
    events: collections.Counter[str] = field(default_factory=collections.Counter)
    first_timestamp_ms: int | None = None
    last_timestamp_ms: int | None = None
    max_body_bytes: int = 0
    total_body_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "deliveries": self.deliveries,
            "copies_of_template": self.copies,
            "distinct_event_ids": len(self.event_ids),
            "duplicate_deliveries": self.deliveries - len(self.event_ids),
            "distinct_task_ids": len(self.task_ids),
            "events": dict(sorted(self.events.items())),
            "first_timestamp_ms": self.first_timestamp_ms,
            "last_timestamp_ms": self.last_timestamp_ms,
            "mean_body_bytes": round(self.total_body_bytes / max(self.deliveries, 1), 1),
            "max_body_bytes": self.max_body_bytes,
        }


def _is_time_key(key: str) -> bool:
    return key in TIME_KEYS or key.endswith("At")


def _times(obj: JSON, key: str = "") -> Iterator[int]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _times(v, k)
    elif isinstance(obj, list):
        for v in obj:
            yield from _times(v, key)
    elif (
        isinstance(obj, int)
        and not isinstance(obj, bool)
        and _is_time_key(key)
        and obj >= MIN_MS_TIME
    ):
        yield obj


def load_template(path: Path) -> Template:
    bodies: list[JSON] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            raw = json.loads(line)["body"]
            body = json.loads(raw)
            if _dump(body) != raw:
                raise SystemExit(f"{path}:{lineno}: body is not compact JSON; cannot template")
            bodies.append(body)
    if not bodies:
        raise SystemExit(f"{path}: no deliveries")
    times = [t for body in bodies for t in _times(body)]
    return Template(bodies=bodies, min_ms=min(times), max_ms=max(times))


def _dump(obj: JSON) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class IdMapper:
    """Maps template ids to fresh ids, one mapping per copy of the template."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._map: dict[str, str] = {}

    def new_copy(self) -> None:
        self._map = {}

    def __call__(self, old: str) -> str:
        new = self._map.get(old)
        if new is None:
            new = self._fresh(old)
            self._map[old] = new
        return new

    def _fresh(self, old: str) -> str:
        # Same shape as the original: hex digits re-drawn, separators and case kept.
        chars = []
        for ch in old:
            if ch in _HEX or ch in "ABCDEF":
                digit = _HEX[self._rng.getrandbits(4)]
                chars.append(digit.upper() if ch.isupper() else digit)
            else:
                chars.append(ch)
        new = "".join(chars)
        if not any(ch in _HEX or ch in "ABCDEF" for ch in old):
            # Not hex at all (e.g. "task-17"): keep it recognisable and make it unique.
            new = f"{old}-{self._rng.getrandbits(64):016x}"
        return new


def rewrite(obj: JSON, ids: IdMapper, shift_ms: int, key: str = "") -> JSON:
    if isinstance(obj, dict):
        return {k: rewrite(v, ids, shift_ms, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rewrite(v, ids, shift_ms, key) for v in obj]
    if isinstance(obj, str) and key in ID_KEYS and obj:
        return ids(obj)
    if (
        isinstance(obj, int)
        and not isinstance(obj, bool)
        and _is_time_key(key)
        and obj >= MIN_MS_TIME
    ):
        return obj + shift_ms
    return obj


def sign(secret: bytes, body: bytes, timestamp_ms: int) -> str:
    mac = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return f"t={timestamp_ms},v1={mac}"


def generate(template: Template, params: Params) -> Iterator[tuple[str, str, JSON]]:
    """Yield (signature, raw body, parsed body) for params.n deliveries."""
    rng = random.Random(params.seed)
    ids = IdMapper(rng)
    key = params.secret.encode("utf-8")
    base_shift = params.base_shift_ms(template)
    produced = 0
    copy = 0
    while produced < params.n:
        ids.new_copy()
        shift = base_shift + copy * template.period_ms
        for tmpl in template.bodies:
            if produced >= params.n:
                return
            body = rewrite(tmpl, ids, shift)
            raw = _dump(body)
            if "\t" in raw or "\n" in raw or "\r" in raw:
                raise AssertionError("compact JSON body contains a raw tab/newline")
            yield sign(key, raw.encode("utf-8"), int(body["timestamp"])), raw, body
            produced += 1
        copy += 1


def _task_id(body: JSON) -> str | None:
    payload = body.get("payload")
    if isinstance(payload, dict) and isinstance(payload.get("task"), dict):
        tid = payload["task"].get("id")
        return tid if isinstance(tid, str) else None
    return None


def write_all(template: Template, params: Params, outputs: list[tuple[str, TextIO]]) -> Stats:
    stats = Stats()
    copy_len = len(template.bodies)
    for sig, raw, body in generate(template, params):
        for fmt, fh in outputs:
            if fmt == "jsonl":
                fh.write(json.dumps({"signature": sig, "body": raw}) + "\n")
            else:
                fh.write(f"{sig}\t{raw}\n")
        stats.deliveries += 1
        stats.event_ids.add(body["id"])
        tid = _task_id(body)
        if tid is not None:
            stats.task_ids.add(tid)
        stats.events[str(body.get("event"))] += 1
        ts = int(body["timestamp"])
        if stats.first_timestamp_ms is None:
            stats.first_timestamp_ms = ts
        stats.last_timestamp_ms = ts
        size = len(raw.encode("utf-8"))
        stats.total_body_bytes += size
        stats.max_body_bytes = max(stats.max_body_bytes, size)
    stats.copies = -(-stats.deliveries // copy_len)
    return stats


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def template_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_meta(template_path: Path, params: Params, fmt: str) -> dict[str, Any]:
    """The parameters that determine a generated file (compared before reusing one)."""
    return {
        "generator": "bench/gen_deliveries.py",
        "format": fmt,
        "n": params.n,
        "seed": params.seed,
        "secret": params.secret,
        "base_time_ms": params.base_time_ms,
        "template": str(template_path),
        "template_sha256": template_digest(template_path),
    }


def read_deliveries(path: Path, limit: int | None = None) -> Iterator[tuple[str, str]]:
    """Yield (signature, raw body) from a jsonl or tsv deliveries file."""
    with path.open(encoding="utf-8", newline="\n") as fh:
        for i, raw_line in enumerate(fh):
            if limit is not None and i >= limit:
                return
            line = raw_line.rstrip("\n")
            if line.startswith("{"):
                d = json.loads(line)
                yield d["signature"], d["body"]
            else:
                sig, sep, raw = line.partition("\t")
                if not sep or "\t" in raw:
                    raise ValueError(f"{path}:{i + 1}: not 'signature<TAB>body'")
                yield sig, raw


def verify_signature(secret: bytes, header: str, body: bytes) -> int | None:
    """Return t if one v1= of a 'Livepeer-Signature' header matches the body, else None."""
    t: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            t = int(value)
        elif name == "v1":
            candidates.append(value)
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    ok = False
    for cand in candidates:
        ok |= hmac.compare_digest(cand, expected)
    return t if ok else None


class _Mismatch(Exception):
    pass


@dataclass
class _Renaming:
    """Template id -> generated id within one copy, checked to be a bijection."""

    shift_ms: int = 0
    fwd: dict[str, str] = field(default_factory=dict)
    back: dict[str, str] = field(default_factory=dict)


def _same_shape(tmpl: JSON, got: JSON, ren: _Renaming, key: str) -> None:
    """Check got == rewrite(tmpl) up to a consistent, injective id renaming."""
    if isinstance(tmpl, dict):
        if not isinstance(got, dict) or list(tmpl) != list(got):
            raise _Mismatch(f"keys differ under {key!r}")
        for k in tmpl:
            _same_shape(tmpl[k], got[k], ren, k)
    elif isinstance(tmpl, list):
        if not isinstance(got, list) or len(tmpl) != len(got):
            raise _Mismatch(f"list differs under {key!r}")
        for a, b in zip(tmpl, got, strict=True):
            _same_shape(a, b, ren, key)
    elif isinstance(tmpl, str) and key in ID_KEYS and tmpl:
        if not isinstance(got, str) or got == tmpl:
            raise _Mismatch(f"{key} {tmpl!r} not rewritten")
        if ren.fwd.setdefault(tmpl, got) != got or ren.back.setdefault(got, tmpl) != tmpl:
            raise _Mismatch(f"{key} {tmpl!r} rewritten inconsistently")
    elif (
        isinstance(tmpl, int)
        and not isinstance(tmpl, bool)
        and _is_time_key(key)
        and tmpl >= MIN_MS_TIME
    ):
        if got != tmpl + ren.shift_ms:
            raise _Mismatch(f"{key} {got} != {tmpl} + {ren.shift_ms}")
    elif tmpl != got or type(tmpl) is not type(got):
        raise _Mismatch(f"{key} {got!r} != {tmpl!r}")


def check(path: Path, template: Template, params: Params, limit: int | None) -> dict[str, int]:
    """Smoke-check a generated file: signatures, t == timestamp, template structure,
    ids consistent within a copy and never reused by another copy."""
    key = params.secret.encode("utf-8")
    base_shift = params.base_shift_ms(template)
    copy_len = len(template.bodies)
    seen_new: dict[str, int] = {}
    ren = _Renaming()
    n = 0
    event_ids: set[str] = set()
    for i, (sig, raw) in enumerate(read_deliveries(path, limit)):
        copy, idx = divmod(i, copy_len)
        if idx == 0:
            ren = _Renaming(shift_ms=base_shift + copy * template.period_ms)
        where = f"{path}:{i + 1}"
        t = verify_signature(key, sig, raw.encode("utf-8"))
        if t is None:
            raise SystemExit(f"{where}: signature does not verify with the given secret")
        body = json.loads(raw)
        if t != body["timestamp"]:
            raise SystemExit(f"{where}: t={t} but body timestamp={body['timestamp']}")
        if _dump(body) != raw:
            raise SystemExit(f"{where}: body is not compact JSON")
        known = len(ren.back)
        try:
            _same_shape(template.bodies[idx], body, ren, "")
        except _Mismatch as exc:
            raise SystemExit(f"{where}: not a copy of template line {idx + 1}: {exc}") from None
        for new in itertools.islice(reversed(ren.back), len(ren.back) - known):
            if seen_new.setdefault(new, copy) != copy:
                raise SystemExit(f"{where}: id {new} reused by copies {seen_new[new]} and {copy}")
        event_ids.add(body["id"])
        n += 1
    return {"checked": n, "distinct_event_ids": len(event_ids)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--deliveries", type=int, default=DEFAULT_N, help="how many")
    ap.add_argument("--secret", default=DEFAULT_SECRET, help="HMAC secret to sign with")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--template", type=Path, default=DEFAULT_TEMPLATE, help="deliveries.jsonl")
    ap.add_argument(
        "--base-time-ms",
        type=int,
        default=None,
        help="move the earliest template time here (default: keep the template's times)",
    )
    ap.add_argument("--jsonl", type=Path, help="write the fixtures' jsonl format here")
    ap.add_argument("--tsv", type=Path, help="write 'signature<TAB>body' lines here (for wrk)")
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument(
        "--check",
        type=Path,
        metavar="FILE",
        help="instead of generating, smoke-check FILE (jsonl or tsv) against the template, "
        "--secret, --base-time-ms",
    )
    ap.add_argument("--check-limit", type=int, default=None, help="check only the first N")
    args = ap.parse_args(argv)
    if args.deliveries <= 0:
        ap.error("--deliveries must be positive")
    params = Params(
        n=args.deliveries, secret=args.secret, seed=args.seed, base_time_ms=args.base_time_ms
    )
    if args.check is not None:
        result = check(args.check, load_template(args.template), params, args.check_limit)
        print(json.dumps({"file": str(args.check), "ok": True, **result}))
        return 0
    if args.jsonl is None and args.tsv is None:
        args.jsonl = REPO / "bench" / "results" / "deliveries.jsonl"

    template = load_template(args.template)
    targets = [("jsonl", args.jsonl), ("tsv", args.tsv)]
    opened: list[tuple[str, Path, TextIO]] = []
    try:
        for fmt, path in targets:
            if path is None:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".partial")
            opened.append((fmt, path, tmp.open("w", encoding="utf-8", newline="\n")))
        stats = write_all(template, params, [(fmt, fh) for fmt, _, fh in opened])
    finally:
        for _, _, fh in opened:
            fh.close()
    summary = stats.as_dict()
    summary["template_deliveries"] = len(template.bodies)
    for fmt, path, _ in opened:
        path.with_name(path.name + ".partial").replace(path)
        meta = build_meta(args.template, params, fmt)
        meta["stats"] = summary
        meta_path(path).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if not args.quiet:
        written = ", ".join(f"{fmt}: {path}" for fmt, path, _ in opened)
        print(f"wrote {written}", file=sys.stderr)
        print(json.dumps(summary, indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
