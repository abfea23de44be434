-- One node's heartbeat (PROTOCOL 5.2, 5.3): the node is alive while its beat is recent; its presence keys live
-- a little longer than the liveness window, so a dead node's entries vanish on their own.
-- KEYS[1] zset node -> last beat (ms, Redis clock); KEYS[2] the node's totals hash; KEYS[3] the node's presence
-- hash (diagnosis -> users). ARGV: 1 node id, 2 key ttl (ms), 3 forget beats older than this (ms), 4 connections.
-- Returns the Redis time in ms.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
redis.call('HSET', KEYS[2], 'c', ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return now
