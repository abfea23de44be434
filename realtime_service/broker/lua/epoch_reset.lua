-- Start a new history for a diagnosis whose offsets went back within one epoch (PROTOCOL 1, 5.3).
-- That happens when Redis comes back with an older copy of its data (a restored snapshot, a failover to a
-- replica that was behind): offsets this node already handed out would be given again, and clients that had them
-- would skip the new messages. A new epoch makes every client resume with `recovered: false` instead.
-- KEYS[1] meta hash; KEYS[2] stream. ARGV: 1 the epoch seen going back, 2 the new epoch, 3 history_ttl (ms).
-- Returns 1 when reset, 0 when another node already did (the epoch is no longer the one seen).
if redis.call('HGET', KEYS[1], 'e') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'e', ARGV[2], 'o', 0, 'b', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
