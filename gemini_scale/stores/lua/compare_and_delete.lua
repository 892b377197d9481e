-- Delete KEYS[1] only if its value is ARGV[1]; 1 if deleted, else 0.
-- Releases a lock only for the holder that set it (single flight).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
