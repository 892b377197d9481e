-- INCRBY KEYS[1] by ARGV[1]; give it a TTL of ARGV[2] ms when it has none (it was just
-- created). Returns the new value.
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return value
