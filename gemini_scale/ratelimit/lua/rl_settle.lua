-- Adjust earlier reservations by a delta (settle to the real usage, or refund).
-- KEYS[i]: the limit's hash; ARGV: for each key, two values: the window index the
-- reservation was made in, and the (possibly negative) delta. Counts never go below 0.
-- A reservation in the window just before the stored one now sits in 'p'; older ones
-- have left the sliding window and are not touched.
for i = 1, #KEYS do
  local index = tonumber(ARGV[2 * i - 1])
  local delta = tonumber(ARGV[2 * i])
  local w = tonumber(redis.call('HGET', KEYS[i], 'w'))
  local field = nil
  if w == index then
    field = 'c'
  elseif w == index + 1 then
    field = 'p'
  end
  if field then
    local value = (tonumber(redis.call('HGET', KEYS[i], field)) or 0) + delta
    if value < 0 then
      value = 0
    end
    redis.call('HSET', KEYS[i], field, value)
  end
end
return #KEYS
