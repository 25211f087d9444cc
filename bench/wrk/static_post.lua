-- One fixed request, for measuring a fake's own ceiling: wrk ... -- METHOD PATH CONTENT_TYPE BODY
function init(args)
  wrk.method, wrk.path = args[1], args[2]
  if args[3] and args[3] ~= "" then wrk.headers["Content-Type"] = args[3] end
  if args[4] and args[4] ~= "" then wrk.body = args[4] end
end

function done(summary, latency, requests)
  io.write(string.format('WRK_JSON {"requests":%d,"duration_us":%d,"status_errors":%d,"lat_p50_us":%d,'
    .. '"lat_p99_us":%d}\n', summary.requests, summary.duration, summary.errors.status,
    latency:percentile(50), latency:percentile(99)))
end
