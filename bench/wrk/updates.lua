-- Posts distinct Telegram updates to a bot's webhook: a new update_id on every request.
--
--   wrk -t1 -c40 -d10s -s updates.lua http://127.0.0.1:PORT -- PATH SECRET KIND ID_BASE CHATS CHAT_BASE [ARG]
--
-- KIND   start  : a private-chat "/start" message (with its bot_command entity, which PTB requires)
--        edited : an edited_message, which trt_bot stores and handles without any Bot API call
-- CHATS  0 : every request comes from a new chat; N > 0 : chat ids cycle through N chats
-- Update ids are ID_BASE + thread * 5,000,000 + n, so runs given different ID_BASEs never repeat one.
-- paced.lua and counted.lua load this file and read ARG (a delay in ms, or an answer count).
-- done() prints one line, "WRK_JSON {...}", that run.py reads (latencies in microseconds).

local STRIDE = 5000000
local threads = {}

function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

local START = '{"update_id":%d,"message":{"message_id":%d,"from":{"id":%d,"is_bot":false,"first_name":"Bench",'
  .. '"language_code":"en"},"chat":{"id":%d,"first_name":"Bench","type":"private"},"date":%d,"text":"/start",'
  .. '"entities":[{"offset":0,"length":6,"type":"bot_command"}]}}'
local EDITED = '{"update_id":%d,"edited_message":{"message_id":%d,"from":{"id":%d,"is_bot":false,"first_name":"Bench",'
  .. '"language_code":"en"},"chat":{"id":%d,"first_name":"Bench","type":"private"},"date":%d,"edit_date":%d,'
  .. '"text":"a prompt, edited"}}'

function init(args)
  path, secret, kind = args[1], args[2], args[3]
  id_base, chats, chat_base = tonumber(args[4]), tonumber(args[5]), tonumber(args[6])
  extra_arg = tonumber(args[7] or "0") or 0
  sent = 0
  first = thread_index * STRIDE
  headers = {["Content-Type"] = "application/json", ["X-Telegram-Bot-Api-Secret-Token"] = secret}
  math.randomseed(id_base + thread_index)
end

function request()
  local n = first + sent
  sent = sent + 1
  local chat = chat_base + (chats > 0 and (n % chats) or n)
  local now = os.time()
  local body
  if kind == "edited" then
    body = string.format(EDITED, id_base + n, n + 1, chat, chat, now - 5, now)
  else
    body = string.format(START, id_base + n, n + 1, chat, chat, now)
  end
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,'
    .. '"status_errors":%d,"timeouts":%d,"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_max_us":%d,'
    .. '"lat_mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
