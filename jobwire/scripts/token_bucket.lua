-- A token bucket in one hash, shared by every process that calls it. Time is the Redis
-- server's (TIME), never the caller's, so callers with skewed clocks cannot over-issue.
-- Idle buckets expire once they would be full again.
--
-- KEYS[1] bucket hash
-- KEYS[2] (optional) the limit's settings hash {rate, capacity}: when it exists, it wins
--         over ARGV, so a limit changed at run time applies to every caller at once
-- ARGV: rate (tokens per second), capacity, requested, max_wait (seconds; 0: never reserve)
--
-- Returns {1, 0} when taken now; {1, ms} when reserved: the tokens are taken from the
-- future and exist in ms, when the caller may go ahead without asking again (waiting
-- callers queue up in order, and no token is handed out twice); {0, ms} when not even a
-- reservation within max_wait is possible: ask again in ms.
local rate, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local requested, max_wait = tonumber(ARGV[3]), tonumber(ARGV[4] or '0')
if KEYS[2] then
  local conf = redis.call('HMGET', KEYS[2], 'rate', 'capacity')
  rate, capacity = tonumber(conf[1]) or rate, tonumber(conf[2]) or capacity
end
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(bucket[1]) or capacity, tonumber(bucket[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local taken, wait_ms = 0, 0
if tokens >= requested then
  tokens, taken = tokens - requested, 1
else
  local wait = (requested - tokens) / rate
  if wait <= max_wait then
    tokens, taken = tokens - requested, 1
  end
  wait_ms = math.ceil(wait * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate * 1000) + 1000)
return {taken, wait_ms}
