-- Reserve, complete or release one Idempotency-Key (PROTOCOL 4, 5.2), so that two nodes getting the same key at
-- the same moment publish once. The record is a hash {s: "pending" | "done", f: body fingerprint, t: owner token,
-- r: result, x: logical expiry (ms, node clock)}.
-- KEYS[1] record. ARGV: 1 mode, 2 owner token, 3 fingerprint, 4 now (ms), 5 ttl (ms: lease for "reserve",
-- retention for "complete"), 6 result (complete).
-- reserve: {"reserved"} when the key was free (or expired) or is already this owner's (a retried call), else
-- {state, fingerprint, result}.
-- complete: stores the result if the caller still owns the reservation; returns 1 or 0.
-- release: forgets a pending reservation the caller owns (its publish failed); returns 1 or 0.
local mode = ARGV[1]
local now = tonumber(ARGV[4])
if mode == 'reserve' then
  local record = redis.call('HMGET', KEYS[1], 's', 'f', 'r', 'x', 't')
  if record[1] == 'pending' and record[5] == ARGV[2] then
    return {'reserved'}
  end
  if record[1] and tonumber(record[4]) > now then
    return {record[1], record[2], record[3] or ''}
  end
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 's', 'pending', 'f', ARGV[3], 't', ARGV[2], 'x', now + tonumber(ARGV[5]))
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {'reserved'}
end
if redis.call('HGET', KEYS[1], 't') ~= ARGV[2] then
  return 0
end
if mode == 'complete' then
  redis.call('HSET', KEYS[1], 's', 'done', 'r', ARGV[6], 'x', now + tonumber(ARGV[5]))
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return 1
end
if redis.call('HGET', KEYS[1], 's') == 'pending' then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
