-- wrk script for bench/bench.py: GET a set of pre-uploaded files round-robin for wrk's duration.
--
-- The list comes from the Lua file named by $BENCH_SPEC (written by bench.py):
--   return { host = "127.0.0.1:PORT", paths = { "/upload/a/b", ... } }
-- No response() hook: defining one makes wrk copy every body into Lua, which would load the
-- generator (it shares the cores with the server). bench.py checks status errors and bytes instead.

local spec = dofile(os.getenv("BENCH_SPEC"))
local requests = {}
local n = 0
local i = 0

function init(args)
   local headers = { ["Host"] = spec.host }
   for _, path in ipairs(spec.paths) do
      requests[#requests + 1] = wrk.format("GET", path, headers)
   end
   n = #requests
end

function request()
   i = i % n + 1
   return requests[i]
end

function done(summary, latency, requests)
   io.write(string.format(
      'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "status_errors": %d, ' ..
      '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d, ' ..
      '"p50_us": %d, "p99_us": %d, "max_us": %d}\n',
      summary.requests, summary.duration, summary.bytes, summary.errors.status,
      summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout,
      latency:percentile(50), latency:percentile(99), latency.max))
end
