-- Take one of a user's connection slots, counted over every live node (PROTOCOL 3.11).
-- Members are "<node id>|<session>"; a member whose node no longer beats is dropped, so a node that died frees
-- its users' slots within the liveness window without anyone cleaning up after it.
-- KEYS[1] the user's set of connections; KEYS[2] zset node -> last beat (ms).
-- ARGV: 1 member, 2 limit, 3 liveness window (ms), 4 key ttl (ms).
-- Returns 1 when taken (or already held), 0 when the user is at the limit.
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then
  return 1
end
local t = redis.call('TIME')
local horizon = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[3])
local live = 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local node = string.match(member, '^([^|]*)|')
  local beat = redis.call('ZSCORE', KEYS[2], node)
  if beat and tonumber(beat) >= horizon then
    live = live + 1
  else
    redis.call('SREM', KEYS[1], member)
  end
end
if live >= tonumber(ARGV[2]) then
  return 0
end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
