-- Personal inbox of one (diagnosis, user) (PROTOCOL 3.8); entries are "stamp_ms|message_id|frame".
-- KEYS[1] list. ARGV: 1 mode ("push" | "take"), 2 entry (push), 3 bound (push), 4 ttl (ms).
-- push: append, keep the newest `bound`, refresh the TTL; returns the length.
-- take: return every entry and empty the list.
if ARGV[1] == 'push' then
  redis.call('RPUSH', KEYS[1], ARGV[2])
  redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return redis.call('LLEN', KEYS[1])
end
local entries = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
return entries
