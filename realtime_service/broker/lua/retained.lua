-- How many broadcasts of one diagnosis are retained: the stream's entries younger than the TTL.
-- KEYS[1] stream. ARGV: 1 now (ms), 2 history_ttl (ms). Returns a count.
local horizon = tonumber(ARGV[1]) - tonumber(ARGV[2])
local total = redis.call('XLEN', KEYS[1])
local old = 0
local start = '-'
while old < total do
  local batch = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 16)
  if #batch == 0 then break end
  for _, entry in ipairs(batch) do
    if tonumber(entry[2][2]) > horizon then
      return total - old
    end
    old = old + 1
  end
  start = '(' .. batch[#batch][1]
end
return total - old
