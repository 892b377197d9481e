-- A leader stores its answer and releases its lock in one round trip.
-- KEYS[1] entry, KEYS[2] lock; ARGV[1] the entry, ARGV[2] its TTL in milliseconds,
-- ARGV[3] the lock's value: the lock is deleted only if it is still ours. Returns 1.
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
return 1
