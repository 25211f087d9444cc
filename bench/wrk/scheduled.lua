-- updates.lua on a schedule: ARG requests per second in all, the way Telegram offers updates at some rate over
-- its connections.  A free connection waits for the next slot; when every connection is busy the slots fall
-- behind and a connection that frees up sends at once, so the offered rate holds as long as the connections
-- suffice (up to connections / ack latency) and does not sag with the server's latency as paced.lua's does.
-- Slots are absolute times (CLOCK_MONOTONIC through LuaJIT's ffi), so wrk's whole-millisecond delays do not
-- add up to a drift.  Meant for one wrk thread (-t1): each thread offers ARG per second.
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "updates.lua")

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local now = ffi.new("bench_timespec")
local next_slot = nil

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, now)
  return tonumber(now.tv_sec) * 1000 + tonumber(now.tv_nsec) / 1e6
end

function delay()
  local at = now_ms()
  next_slot = (next_slot or at) + 1000 / extra_arg
  return math.max(0, math.floor(next_slot - at))
end
