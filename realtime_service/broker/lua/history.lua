-- Retained broadcasts after an offset, with the stream's position, read in one step so that they agree.
-- KEYS[1] meta hash; KEYS[2] stream. ARGV: 1 since, 2 now (ms), 3 history_ttl (ms), 4 epoch to create if none.
-- Returns {offset, epoch, oldest retained offset (offset + 1 if none), id1, body1, id2, body2, ...}.
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[4]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0, 'b', 0)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local newest = tonumber(redis.call('HGET', KEYS[1], 'o'))
local horizon = tonumber(ARGV[2]) - tonumber(ARGV[3])
-- entries older than the TTL that no publish trimmed yet are not retained
local oldest = newest + 1
local start = '-'
while true do
  local batch = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', 16)
  if #batch == 0 then break end
  local found = false
  for _, entry in ipairs(batch) do
    if tonumber(entry[2][2]) > horizon then
      oldest = tonumber(string.match(entry[1], '^(%d+)'))
      found = true
      break
    end
  end
  if found then break end
  start = '(' .. batch[#batch][1]
end
local out = {newest, epoch, oldest}
local since = tonumber(ARGV[1])
local from = math.max(since + 1, oldest)
if from <= newest then
  for _, entry in ipairs(redis.call('XRANGE', KEYS[2], from .. '-0', '+')) do
    table.insert(out, entry[1])
    table.insert(out, entry[2][6])
  end
end
return out
