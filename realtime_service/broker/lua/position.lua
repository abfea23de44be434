-- The newest offset and epoch of a diagnosis, creating its epoch on first use (PROTOCOL 1, 3.2).
-- Reading keeps a watched diagnosis's epoch alive: its meta key lives history_ttl past the last read or write.
-- KEYS[1] meta hash; KEYS[2] stream. ARGV: 1 epoch to create if none, 2 history_ttl (ms).
-- Returns {offset, epoch}.
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0, 'b', 0)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {tonumber(redis.call('HGET', KEYS[1], 'o')), epoch}
