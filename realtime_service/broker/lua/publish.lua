-- Publish one broadcast atomically (PROTOCOL 5.1): create the epoch on first use, take the next offset, append
-- to the stream, trim it to the retention bounds, refresh the TTLs and hand it to every subscribed node.
-- KEYS[1] meta hash {e: epoch, o: newest offset, b: retained frame bytes}; KEYS[2] stream (entry id = offset);
-- KEYS[3] this publish's id: a retry of a publish whose answer was lost gets the first answer, not a second
-- offset.
-- ARGV: 1 body, 2 exclude_session or "", 3 now (ms, node clock: retention), 4 history_size, 5 history_max_bytes,
--       6 history_ttl (ms), 7 deadline (ms, Redis clock; 0 = none), 8 channel, 9 epoch to create if none,
--       10 plaintext body length (the stored body may be sealed), 11 expected offset (0 = any),
--       12 how long a publish id is remembered (ms), 13 and 14 the newest offset and its epoch this node already
--       handed on (0 and "" if none).
-- Returns {offset, epoch}, or {-1, "late"} past the deadline, or {-2, epoch, newest} when the expected offset
-- is not the next one (a sealed body names its offset, so the caller seals again and retries).
local done = redis.call('GET', KEYS[3])
if done then
  local offset, epoch = string.match(done, '^(%d+)|(.*)$')
  return {tonumber(offset), epoch}
end
local deadline = tonumber(ARGV[7])
if deadline > 0 then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > deadline then
    return {-1, 'late'}
  end
end
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[9]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0, 'b', 0)
end
-- Offsets below what a node already handed on, in the same epoch, mean Redis came back with an older copy of
-- its data (a restored snapshot, a failover to a replica that was behind): rather than give an offset out again,
-- start a new history, so that every client resumes with `recovered: false`.
local known = tonumber(ARGV[13])
if known > 0 and epoch == ARGV[14] and tonumber(redis.call('HGET', KEYS[1], 'o')) < known then
  epoch = ARGV[9]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0, 'b', 0)
end
local expected = tonumber(ARGV[11])
if expected > 0 then
  local newest = tonumber(redis.call('HGET', KEYS[1], 'o'))
  if newest + 1 ~= expected then
    return {-2, epoch, newest}
  end
end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
-- what the entry adds to a replay: the frame (the body plus ,"offset":N,"epoch":"E") and a comma
local size = tonumber(ARGV[10]) + 22 + string.len(tostring(offset)) + string.len(epoch)
redis.call('XADD', KEYS[2], offset .. '-0', 't', ARGV[3], 'n', size, 'b', ARGV[1])
local bytes = redis.call('HINCRBY', KEYS[1], 'b', size)
local keep = tonumber(ARGV[4])
local max_bytes = tonumber(ARGV[5])
local horizon = tonumber(ARGV[3]) - tonumber(ARGV[6])
while true do
  local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
  if not first then break end
  local fields = first[2]
  local stamp, first_size = tonumber(fields[2]), tonumber(fields[4])
  if redis.call('XLEN', KEYS[2]) > keep or bytes > max_bytes or stamp <= horizon then
    redis.call('XDEL', KEYS[2], first[1])
    bytes = redis.call('HINCRBY', KEYS[1], 'b', -first_size)
  else
    break
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('SET', KEYS[3], offset .. '|' .. epoch, 'PX', ARGV[12])
redis.call('PUBLISH', ARGV[8], offset .. '\n' .. epoch .. '\n' .. ARGV[2] .. '\n' .. ARGV[1])
return {offset, epoch}
