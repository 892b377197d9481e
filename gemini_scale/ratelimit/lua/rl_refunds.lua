-- Shared prelude of the limiter's scripts: settlements first, then (for acquire) the limits.
-- KEYS: n limit keys, then m settled keys; ARGV: three values per limit key (limit, window in
-- ms, cost), then two per settled key (the window index its reservation was made in, and the
-- possibly negative delta). So n = #ARGV - 2 * #KEYS, and a plain acquire has m = 0.
-- A reservation in the window just before the stored one now sits in 'p'; older ones have
-- left the sliding window and are not touched. Counts never go below 0.
local n = #ARGV - 2 * #KEYS
for j = n + 1, #KEYS do
  local at = 3 * n + 2 * (j - n)
  local index = tonumber(ARGV[at - 1])
  local delta = tonumber(ARGV[at])
  local w = tonumber(redis.call('HGET', KEYS[j], 'w'))
  local field = nil
  if w == index then
    field = 'c'
  elseif w == index + 1 then
    field = 'p'
  end
  if field then
    local value = (tonumber(redis.call('HGET', KEYS[j], field)) or 0) + delta
    if value < 0 then
      value = 0
    end
    redis.call('HSET', KEYS[j], field, value)
  end
end
