-- wrk script: replay pre-signed Livepeer webhook deliveries.
--
--   PHASEWATCH_BENCH_DELIVERIES=bench/results/deliveries-200000-s1.tsv \
--   PHASEWATCH_BENCH_THREADS=1 \
--   wrk -t1 -c32 -d15s -s bench/wrk_replay.lua http://127.0.0.1:8080
--
-- The deliveries file is what `bench/gen_deliveries.py --tsv` writes: one delivery a
-- line, "<Livepeer-Signature value>\t<raw compact JSON body>\n" (wrk's Lua has no JSON
-- parser; compact JSON never contains a raw tab or newline).
--
-- Environment:
--   PHASEWATCH_BENCH_DELIVERIES  path of the tsv file (required)
--   PHASEWATCH_BENCH_THREADS     wrk's -t (default 1; a mismatch is reported in done())
--   PHASEWATCH_BENCH_OFFSET      first line (0-based) of the window to replay (default 0)
--   PHASEWATCH_BENCH_COUNT       lines in the window (default: the rest of the file)
--   PHASEWATCH_BENCH_PATH        request path (default /webhooks/livepeer)
--   PHASEWATCH_BENCH_NO_STATUS   "1": define no response() (wrk then skips parsing
--                                headers/bodies; only statuses > 399 are counted)
--
-- The window is cut into one contiguous, disjoint slice per wrk thread (thread ids are
-- handed out in setup()), so no two threads ever send the same delivery. Each thread
-- pre-builds all its requests in init() and sends them in order. If a thread runs out,
-- it starts its slice again and counts a wrap: the orchestrator treats a run with wraps
-- as invalid (the server would have seen repeats), so size the file for rate x duration.
--
-- done() prints machine-readable lines for bench/webhook_bench.py:
--   PWBENCH key=value ...                       totals, errors, latency (microseconds)
--   PWBENCH_THREAD id=.. first=.. loaded=.. sent=.. responses=.. non2xx=.. wraps=..
--   PWBENCH_STATUS thread=.. code=.. count=..   one per non-2xx status seen
--   PWBENCH_ERROR message                       configuration problems

local env_threads = tonumber(os.getenv("PHASEWATCH_BENCH_THREADS") or "1")
local threads = {}
local next_id = 0

function setup(thread)
   thread:set("id", next_id)
   table.insert(threads, thread)
   next_id = next_id + 1
end

local function count_lines(path)
   local f = assert(io.open(path, "rb"))
   local n, last = 0, nil
   while true do
      local block = f:read(4 * 1024 * 1024)
      if not block then break end
      local pos = 1
      while true do
         local nl = string.find(block, "\n", pos, true)
         if not nl then break end
         n = n + 1
         pos = nl + 1
      end
      last = string.sub(block, -1)
   end
   f:close()
   if last ~= nil and last ~= "\n" then n = n + 1 end
   return n
end

local function request_prefix(path)
   -- Headers from wrk (Host, plus any -H given on the command line) come first.
   local parts = { "POST " .. path .. " HTTP/1.1" }
   local skip = {
      ["content-type"] = true, ["content-length"] = true,
      ["livepeer-signature"] = true, ["user-agent"] = true,
   }
   for name, value in pairs(wrk.headers) do
      if not skip[string.lower(name)] then
         parts[#parts + 1] = name .. ": " .. value
      end
   end
   parts[#parts + 1] = "Content-Type: application/json"
   parts[#parts + 1] = "User-Agent: livepeer.studio"
   return table.concat(parts, "\r\n") .. "\r\n"
end

function init(args)
   local t0 = os.clock()
   local path = os.getenv("PHASEWATCH_BENCH_DELIVERIES")
   if path == nil or path == "" then
      error("set PHASEWATCH_BENCH_DELIVERIES to a tsv written by bench/gen_deliveries.py")
   end
   nthreads = env_threads
   if id >= nthreads then
      error(string.format("thread id %d >= PHASEWATCH_BENCH_THREADS=%d: set it to wrk's -t",
                          id, nthreads))
   end
   local offset = tonumber(os.getenv("PHASEWATCH_BENCH_OFFSET") or "0")
   local count = tonumber(os.getenv("PHASEWATCH_BENCH_COUNT") or "")
   if count == nil then
      count = count_lines(path) - offset
   end
   first = offset + math.floor(id * count / nthreads)
   local last = offset + math.floor((id + 1) * count / nthreads) -- exclusive

   local prefix = request_prefix(os.getenv("PHASEWATCH_BENCH_PATH") or "/webhooks/livepeer")
   reqs = {}
   local lineno = 0
   for line in io.lines(path) do
      if lineno >= last then break end
      if lineno >= first then
         local tab = string.find(line, "\t", 1, true)
         if tab == nil then
            error(string.format("%s:%d: expected 'signature<TAB>body'", path, lineno + 1))
         end
         local body = string.sub(line, tab + 1)
         if string.sub(body, -1) == "\r" then body = string.sub(body, 1, -2) end
         reqs[#reqs + 1] = prefix
            .. "Livepeer-Signature: " .. string.sub(line, 1, tab - 1) .. "\r\n"
            .. "Content-Length: " .. #body .. "\r\n\r\n"
            .. body
      end
      lineno = lineno + 1
   end
   loaded = #reqs
   if loaded == 0 then
      error(string.format("thread %d: empty slice [%d, %d) of %s", id, first, last, path))
   end
   load_ms = math.floor((os.clock() - t0) * 1000)
   cursor = 0
   sent = 0
   responses = 0
   non2xx = 0
   wraps = 0
   statuses = {}
   status_counted = os.getenv("PHASEWATCH_BENCH_NO_STATUS") ~= "1"
   if not status_counted then
      response = nil
   end
end

function request()
   cursor = cursor + 1
   if cursor > loaded then
      cursor = 1
      wraps = wraps + 1
   end
   sent = sent + 1
   return reqs[cursor]
end

function response(status, headers, body)
   responses = responses + 1
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
      local key = tostring(status)
      statuses[key] = (statuses[key] or 0) + 1
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   local tot = { sent = 0, responses = 0, non2xx = 0, wraps = 0, loaded = 0 }
   local counted = true
   for _, thread in ipairs(threads) do
      local tid = thread:get("id")
      local row = {}
      for _, k in ipairs({ "first", "loaded", "sent", "responses", "non2xx", "wraps", "load_ms" }) do
         row[k] = thread:get(k) or 0
      end
      if not thread:get("status_counted") then counted = false end
      for k, _ in pairs(tot) do tot[k] = tot[k] + row[k] end
      io.write(string.format(
         "PWBENCH_THREAD id=%d first=%d loaded=%d sent=%d responses=%d non2xx=%d wraps=%d load_ms=%d\n",
         tid, row.first, row.loaded, row.sent, row.responses, row.non2xx, row.wraps, row.load_ms))
      local st = thread:get("statuses") or {}
      for code, n in pairs(st) do
         io.write(string.format("PWBENCH_STATUS thread=%d code=%s count=%d\n", tid, code, n))
      end
   end
   if #threads ~= env_threads then
      io.write(string.format(
         "PWBENCH_ERROR wrk ran %d threads but PHASEWATCH_BENCH_THREADS=%d: slices overlap or are missing\n",
         #threads, env_threads))
   end
   local secs = summary.duration / 1e6
   io.write(string.format(
      "PWBENCH requests=%d duration_us=%d rps=%.2f bytes=%d connect_errors=%d read_errors=%d"
         .. " write_errors=%d timeout_errors=%d status_errors=%d non2xx=%s sent=%d"
         .. " responses=%d loaded=%d wraps=%d threads=%d"
         .. " lat_mean_us=%.1f lat_stdev_us=%.1f lat_min_us=%d lat_max_us=%d"
         .. " lat_p50_us=%d lat_p90_us=%d lat_p99_us=%d lat_p999_us=%d\n",
      summary.requests, summary.duration, summary.requests / secs, summary.bytes,
      e.connect, e.read, e.write, e.timeout, e.status,
      counted and tostring(tot.non2xx) or "unknown", tot.sent, tot.responses, tot.loaded,
      tot.wraps, #threads,
      latency.mean, latency.stdev, latency.min, latency.max,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9)))
end
