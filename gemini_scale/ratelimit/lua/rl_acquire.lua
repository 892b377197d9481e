-- Sliding-window-counter acquire for several limits at once, all or nothing, after the
-- settlements the prelude applied (a bucket's deferred refunds ride on its next acquire).
-- KEYS[i], i <= n: one hash per limit {w = window index, c = count in window w, p = count in
-- w - 1}. ARGV: for each limit i, three values: limit, window (ms), cost.
-- Time comes from the server (TIME), never from the caller, so replica clocks do not matter.
-- Returns {allowed, now_ms, then per limit: index, current, previous} (integers), where
-- current includes this request's cost when it was allowed.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rows = {}
local allowed = 1
for i = 1, n do
  local limit = tonumber(ARGV[3 * i - 2])
  local window = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local index = math.floor(now / window)
  local h = redis.call('HMGET', KEYS[i], 'w', 'c', 'p')
  local w = tonumber(h[1])
  local cur, prev = 0, 0
  if w == index then
    cur = tonumber(h[2]) or 0
    prev = tonumber(h[3]) or 0
  elseif w == index - 1 then
    prev = tonumber(h[2]) or 0
  end
  local weight = (window - (now - index * window)) / window
  if prev * weight + cur + cost > limit then
    allowed = 0
  end
  rows[i] = {index, cur, prev, window, cost}
end
local out = {allowed, now}
for i = 1, n do
  local row = rows[i]
  local cur = row[2]
  if allowed == 1 and row[5] > 0 then
    cur = cur + row[5]
    redis.call('HSET', KEYS[i], 'w', row[1], 'c', cur, 'p', row[3])
    redis.call('PEXPIRE', KEYS[i], 2 * row[4])
  end
  out[#out + 1] = row[1]
  out[#out + 1] = cur
  out[#out + 1] = row[3]
end
return out
