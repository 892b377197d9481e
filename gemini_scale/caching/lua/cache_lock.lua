-- A miss takes the single-flight lock of its key, unless the entry is there already.
-- KEYS[1] entry, KEYS[2] lock (one hash slot: both carry the entry's {tag});
-- ARGV[1] the lock's value (a random token), ARGV[2] its TTL in milliseconds.
-- Returns {1, entry} (a leader stored it meanwhile), {0} (locked: lead) or {2} (taken).
local entry = redis.call('GET', KEYS[1])
if entry then
  return {1, entry}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {0}
end
return {2}
