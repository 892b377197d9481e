-- The server's current time in microseconds, from Redis TIME (never the caller's clock).
local t = redis.call('TIME')
return tonumber(t[1]) * 1000000 + tonumber(t[2])
