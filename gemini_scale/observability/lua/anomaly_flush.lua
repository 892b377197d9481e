-- Usage anomalies: merge one replica's counts into each principal's shared state, roll its
-- windows, fold closed windows into its baselines, judge it, and report flag changes.
--
-- KEYS[i]: one string per principal (all keys under the {anomaly} hash tag), the fields
--   "w ar at br bt n er et fl": w the newest window index seen; ar, at the requests and tokens
--   counted in window w; br, bt those of window w - 1; n the active windows folded into the
--   baselines er, et (per full window); fl the flags of the last judgement (1 requests,
--   2 tokens).
-- ARGV: now (the caller's window index), factor, alpha, warmup, min requests, min tokens,
--   TTL (ms), window length (s), the caller's time (s), the largest clock skew trusted (s;
--   negative: any), then six per key: x1, r1, t1, x2, r2, t2 (counts observed in the caller's
--   window x; zero counts skipped).
--   Window indexes come from the caller's clock, taken when the counts were observed: a late
--   flush never moves counts into a later window (gemini_scale/observability/anomaly.py). A
--   caller whose clock strays from the server's TIME by more than the skew (a clock stepped
--   or badly set) has its windows moved onto the server's, keeping their distance to now:
--   one replica's clock must not roll every principal's windows forward (or back).
-- Returns nine integers per key: flags, newly raised flags, n, observed requests, requests
--   baseline x 1000, the observed window, then the same three for tokens.
local now = tonumber(ARGV[1])
local factor = tonumber(ARGV[2])
local alpha = tonumber(ARGV[3])
local warmup = tonumber(ARGV[4])
local floors = {tonumber(ARGV[5]), tonumber(ARGV[6])}
local ttl = ARGV[7]
local shift = 0
local skew = tonumber(ARGV[10])
if skew >= 0 then
  local t = redis.call('TIME')
  local server = tonumber(t[1]) + tonumber(t[2]) / 1000000
  if math.abs(server - tonumber(ARGV[9])) > skew then
    local ours = math.floor(server / tonumber(ARGV[8]))
    shift = ours - now
    now = ours
  end
end

local function fold(s, count, baseline, floor)
  -- A window past warm-up weighs in at most `factor` times the baseline, so a burst cannot
  -- teach the baseline its own level in one window. The first windows are averaged.
  if s.n >= warmup then
    count = math.min(count, factor * math.max(baseline, floor))
  end
  return baseline + math.max(alpha, 1 / (s.n + 1)) * (count - baseline)
end

local function close(s, r, t)
  if r > 0 or t > 0 then -- idle windows are skipped: a baseline is the rate while active
    s.er = fold(s, r, s.er, floors[1])
    s.et = fold(s, t, s.et, floors[2])
    s.n = s.n + 1
  end
end

local function advance(s, x)
  if s.w == nil then
    s.w = x
    return
  end
  if x <= s.w then
    return
  end
  close(s, s.br, s.bt)
  if x == s.w + 1 then
    s.br, s.bt = s.ar, s.at
  else
    close(s, s.ar, s.at)
    s.br, s.bt = 0, 0
    s.fl = 0 -- the windows those flags judged have both left
  end
  s.ar, s.at, s.w = 0, 0, x
end

local function judge(s, current, previous, baseline, floor)
  local observed, window = current, s.w
  if previous > current then
    observed, window = previous, s.w - 1
  end
  local raised = s.n >= warmup and observed > floor
    and observed > factor * math.max(baseline, floor)
  return raised, observed, window
end

local function has(mask, bit)
  return math.floor(mask / bit) % 2 == 1
end

local out = {}
for i = 1, #KEYS do
  local s = {ar = 0, at = 0, br = 0, bt = 0, n = 0, er = 0, et = 0, fl = 0}
  local raw = redis.call('GET', KEYS[i])
  if raw then
    local v = {}
    for field in string.gmatch(raw, '%S+') do
      v[#v + 1] = tonumber(field)
    end
    s.w, s.ar, s.at, s.br, s.bt = v[1], v[2], v[3], v[4], v[5]
    s.n, s.er, s.et, s.fl = v[6], v[7], v[8], v[9]
  end
  local at = 10 + 6 * (i - 1)
  for j = 0, 3, 3 do
    local x = tonumber(ARGV[at + j + 1]) + shift
    local r = tonumber(ARGV[at + j + 2])
    local t = tonumber(ARGV[at + j + 3])
    if r > 0 or t > 0 then
      advance(s, x)
      if x == s.w then
        s.ar, s.at = s.ar + r, s.at + t
      elseif x == s.w - 1 then
        s.br, s.bt = s.br + r, s.bt + t
      end -- older windows have been folded already: too late, dropped
    end
  end
  if s.w == nil then
    for _ = 1, 9 do
      out[#out + 1] = 0
    end
  else
    advance(s, now)
    local before = s.fl
    local up_r, seen_r, win_r = judge(s, s.ar, s.br, s.er, floors[1])
    local up_t, seen_t, win_t = judge(s, s.at, s.bt, s.et, floors[2])
    local flags, raised = 0, 0
    if up_r then
      flags = 1
      if not has(before, 1) then
        raised = 1
      end
    end
    if up_t then
      flags = flags + 2
      if not has(before, 2) then
        raised = raised + 2
      end
    end
    s.fl = flags
    redis.call('SET', KEYS[i], string.format('%.17g %.17g %.17g %.17g %.17g %.17g %.17g %.17g %.17g',
      s.w, s.ar, s.at, s.br, s.bt, s.n, s.er, s.et, s.fl), 'PX', ttl)
    out[#out + 1] = flags
    out[#out + 1] = raised
    out[#out + 1] = s.n
    out[#out + 1] = seen_r
    out[#out + 1] = math.floor(s.er * 1000)
    out[#out + 1] = win_r
    out[#out + 1] = seen_t
    out[#out + 1] = math.floor(s.et * 1000)
    out[#out + 1] = win_t
  end
end
return out
