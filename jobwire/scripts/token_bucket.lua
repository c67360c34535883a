-- A token bucket in one hash, shared by every process that calls it: take `requested`
-- tokens if there are that many. Time is the Redis server's (TIME), never the caller's,
-- so callers with skewed clocks cannot over-issue. Idle buckets expire once full again.
--
-- KEYS[1] bucket hash   ARGV: rate (tokens per second), capacity, requested
-- Returns {1, 0} when taken, else {0, ms until enough tokens exist}.
local rate, capacity, requested = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(bucket[1]) or capacity, tonumber(bucket[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local taken, wait_ms = 0, 0
if tokens >= requested then
  tokens = tokens - requested
  taken = 1
else
  wait_ms = math.ceil((requested - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate * 1000) + 1000)
return {taken, wait_ms}
