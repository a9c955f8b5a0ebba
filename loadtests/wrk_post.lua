-- wrk script of loadtests/frontend_wrk.py: POST one image (the file BODY, Content-Type CTYPE)
-- on every request, and write what wrk counted as JSON to SUMMARY once the run is done.
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("CTYPE")
local f = assert(io.open(os.getenv("BODY"), "rb"))
wrk.body = f:read("*a")
f:close()

function done(summary, latency, requests)
  local e = summary.errors
  local out = assert(io.open(os.getenv("SUMMARY"), "w"))
  out:write(string.format(
    '{"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d}, "latency_us": {"p50": %d, "p99": %d, "p99.9": %d, "max": %d}}',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
  out:close()
end
