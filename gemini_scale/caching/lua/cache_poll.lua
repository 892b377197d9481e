-- A single-flight follower's poll: the entry if it is there, else whether the leader still
-- holds its lock. KEYS[1] entry, KEYS[2] lock (one hash slot: both carry the entry's {tag}).
-- Returns {1, entry}, {0} (the leader is still at work) or {2} (no entry, no leader).
local entry = redis.call('GET', KEYS[1])
if entry then
  return {1, entry}
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {0}
end
return {2}
