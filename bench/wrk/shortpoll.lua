-- The short-polling mix for wrk (bench/shortpoll.py): GET every path of a list file in turn, the list
-- written by the benchmark (one path a line, already shuffled), so every server gets the same requests.
--
--   wrk -t1 -c50 -d10s --latency -s bench/wrk/shortpoll.lua http://127.0.0.1:PORT -- paths.txt
--
-- Each wrk thread starts at its own offset into the list. At the end one line is printed for the
-- benchmark to parse: "shortpoll-summary {json}" with the counts, errors and latency percentiles (µs).

local requests = {}
local count = 0
local index = 0
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local path = args[1]
  if path == nil then
    error("shortpoll.lua needs the path list file: wrk ... -s shortpoll.lua URL -- paths.txt")
  end
  for line in io.lines(path) do
    if #line > 0 then
      count = count + 1
      requests[count] = wrk.format("GET", line)
    end
  end
  if count == 0 then
    error("no paths in " .. path)
  end
  index = (id or 0) * 7919 % count  -- a prime stride: threads do not move in step
end

function request()
  index = index + 1
  if index > count then
    index = 1
  end
  return requests[index]
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'shortpoll-summary {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
