-- The nodes whose last beat is within the liveness window, by the Redis clock (nodes' clocks may disagree).
-- KEYS[1] zset node -> last beat (ms). ARGV: 1 window (ms). Returns the node ids.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')
