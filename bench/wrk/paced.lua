-- updates.lua with pacing: each connection waits about ARG ms (uniformly 0.5-1.5x) before its next
-- request, so 40 connections offer roughly 40 * 1000 / (ARG + latency) requests per second whatever
-- the server does (an open-ish loop; wrk has no fixed-rate mode).
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "updates.lua")

function delay()
  return extra_arg * (0.5 + math.random())
end
