-- SADD ARGV[2..] to KEYS[1], then make its TTL max(remaining, ARGV[1] ms).
local n = #ARGV
local chunk = 1000  -- unpack() is bounded by the Lua C stack
for i = 2, n, chunk do
  redis.call('SADD', KEYS[1], unpack(ARGV, i, math.min(i + chunk - 1, n)))
end
local ttl = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 0
