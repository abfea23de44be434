-- Create, move or set one device's delivery cursor (PROTOCOL 3.7); values are "offset|epoch|confirmed_at_ms".
-- KEYS[1] hash device -> cursor, one per (diagnosis, user); KEYS[2] set of the diagnosis's users with cursors.
-- ARGV: 1 mode ("init": create if absent; "confirm": move forward within the epoch; "reset": set),
--       2 user id, 3 device, 4 offset, 5 epoch, 6 now (ms), 7 max devices per user, 8 ttl (ms).
-- Returns the cursor's value after the step.
local mode, device = ARGV[1], ARGV[3]
local value = ARGV[4] .. '|' .. ARGV[5] .. '|' .. ARGV[6]
local current = redis.call('HGET', KEYS[1], device)
if mode == 'init' then
  if current then
    return current
  end
elseif mode == 'confirm' and current then
  local offset, epoch = string.match(current, '^(%d+)|([^|]*)|')
  if epoch == ARGV[5] and tonumber(ARGV[4]) <= tonumber(offset) then
    return current
  end
end
if not current and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[7]) then
  -- device ids are chosen by clients: forget the stalest device rather than grow without bound
  local all = redis.call('HGETALL', KEYS[1])
  local stalest, stalest_at = nil, nil
  for i = 1, #all, 2 do
    local at = tonumber(string.match(all[i + 1], '|(%d+)$'))
    if stalest_at == nil or at < stalest_at then
      stalest, stalest_at = all[i], at
    end
  end
  redis.call('HDEL', KEYS[1], stalest)
end
redis.call('HSET', KEYS[1], device, value)
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('PEXPIRE', KEYS[2], ARGV[8])
return value
