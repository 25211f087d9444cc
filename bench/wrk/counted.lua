-- updates.lua that stops each thread after ARG answers.  wrk itself still waits for -d, so each
-- thread then prints "WRK_LIMIT" and run.py interrupts wrk (SIGINT), which makes it report at once.
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "updates.lua")

local answered = 0

function response(status, headers, body)
  answered = answered + 1
  if answered == extra_arg then
    io.write("WRK_LIMIT\n")
    io.stdout:flush()
    wrk.thread:stop()
  end
end
