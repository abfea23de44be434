-- Personal inbox of one (diagnosis, user) (PROTOCOL 3.8); entries are "stamp_ms|message_id|frame".
-- A kept message stays until a connection confirmed it, so one sent to a connection that died is sent again.
-- KEYS[1] list. ARGV: 1 mode ("push" | "list" | "drop"), 2 bound (push), 3 ttl (ms, push), 4... entry (push) or
-- the message ids to drop (drop).
-- push: append, keep the newest `bound`, refresh the TTL; returns the length.
-- list: every entry, oldest first. drop: remove the entries of these ids; returns how many are left.
local mode = ARGV[1]
if mode == 'push' then
  redis.call('RPUSH', KEYS[1], ARGV[4])
  redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return redis.call('LLEN', KEYS[1])
end
if mode == 'list' then
  return redis.call('LRANGE', KEYS[1], 0, -1)
end
local gone = {}
for i = 4, #ARGV do
  gone[ARGV[i]] = true
end
local ttl = redis.call('PTTL', KEYS[1])
local keep = {}
for _, entry in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local id = string.match(entry, '^%d+|([^|]*)|')
  if not gone[id] then
    table.insert(keep, entry)
  end
end
redis.call('DEL', KEYS[1])
if #keep > 0 then
  redis.call('RPUSH', KEYS[1], unpack(keep))
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
end
return #keep
