-- wrk script for bench/bench.py: PUT every pre-signed URL of a list exactly once, then stop.
--
-- The list comes from the Lua file named by $BENCH_SPEC (written by bench.py):
--   return { host = "127.0.0.1:PORT", threads = N, size = 4096, done_dir = "/path",
--            paths = { "/upload/a/b?v=hex", ... } }
-- Thread t (0-based) sends paths t+1, t+1+N, ... Each body is "%08d" of the 1-based index
-- followed by a fixed filler, so bench.py can check what was stored.
-- wrk keeps every connection busy, so once a thread's share is sent its idle connections
-- get an unterminated request (no blank line): the server waits for more headers and sends
-- nothing, which adds no load and no latency sample. When a thread has all its responses it
-- writes done_dir/<tid> and stops; bench.py then sends SIGINT to end wrk's fixed duration.
-- Timing uses clock_gettime through LuaJIT's FFI because wrk's own duration includes that wait.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_us()
   ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
   return tonumber(ts.tv_sec) * 1000000 + math.floor(tonumber(ts.tv_nsec) / 1000)
end

local spec = dofile(os.getenv("BENCH_SPEC"))

local threads = {}
local next_tid = 0

function setup(thread)
   thread:set("tid", next_tid)
   next_tid = next_tid + 1
   table.insert(threads, thread)
end

local requests = {}
local share = 0
local sent = 0
local received = 0
local verified
local hang = "GET /upload/-bench-idle HTTP/1.1\r\nHost: " .. spec.host .. "\r\n"

function init(args)
   local filler = string.rep("0123456789abcdef", math.ceil(spec.size / 16))
   filler = string.sub(filler, 1, spec.size - 8)
   local headers = { ["Host"] = spec.host, ["Content-Type"] = "application/octet-stream" }
   for i = tid + 1, #spec.paths, spec.threads do
      local body = string.format("%08d", i) .. filler
      requests[#requests + 1] = wrk.format("PUT", spec.paths[i], headers, body)
   end
   share = #requests
   -- wrk calls request() once on thread 0 before starting it, only to check the format.
   verified = (tid ~= 0)
   ok = 0
   bad = 0
   t_first = 0
   t_last = 0
end

function finish()
   local f = io.open(spec.done_dir .. "/" .. tid, "w")
   if f then
      f:write(tostring(received))
      f:close()
   end
   wrk.thread:stop()
end

function request()
   if not verified then
      verified = true
      return requests[1]
   end
   if sent < share then
      sent = sent + 1
      if sent == 1 then
         t_first = now_us()
      end
      return requests[sent]
   end
   return hang
end

function response(status, headers, body)
   received = received + 1
   if status == 201 or status == 204 then
      ok = ok + 1
   else
      bad = bad + 1
      if bad <= 3 then
         io.stderr:write(string.format("wrk_put: status %d: %s\n", status, string.sub(body or "", 1, 200)))
      end
   end
   if received == share then
      t_last = now_us()
      finish()
   end
end

function done(summary, latency, requests)
   local first, last, n_ok, n_bad = nil, 0, 0, 0
   for _, t in ipairs(threads) do
      local tf, tl = t:get("t_first"), t:get("t_last")
      if tf and tf > 0 and (first == nil or tf < first) then first = tf end
      if tl and tl > last then last = tl end
      n_ok = n_ok + (t:get("ok") or 0)
      n_bad = n_bad + (t:get("bad") or 0)
   end
   io.write(string.format(
      'BENCH_JSON {"ok": %d, "bad": %d, "first_us": %d, "last_us": %d, "responses": %d, ' ..
      '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "connect_errors": %d, ' ..
      '"read_errors": %d, "write_errors": %d, "timeouts": %d}\n',
      n_ok, n_bad, first or 0, last, summary.requests,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout))
end
