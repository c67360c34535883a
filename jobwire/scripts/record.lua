-- Record one job event: allocate its seq, update the job hash, append to the bounded
-- history, optionally write Celery's own result meta, and publish -- all atomically, in
-- the one round trip the caller pays. Returns the seq, or false when the event is refused
-- (the job is already final, or only_if_new was asked and the job exists).
--
-- KEYS[1] job hash   KEYS[2] history zset   KEYS[3] recent-jobs zset
-- KEYS[4] the owner tenant's recent-jobs zset (KEYS[3] again when no owner is given)
-- KEYS[5] (optional) Celery result key, written exactly as Celery's Redis backend does
-- ARGV: job_id, state, final('1'/'0'), head, tail, progress_json, result_json, error_json,
--       task, ts, history_limit, ttl, only_if_new('1'/'0'), job_channel, all_channel,
--       recent_limit, event_id, tenant, sub, tenant_channel_prefix, epoch, celery_value, celery_ttl
--
-- The epoch names this incarnation of the job's stream: set when the job record is created,
-- so a record recreated after its history was lost (a Redis restart without persistence)
-- gets a new one, and its seqs (starting at 1 again) cannot be mistaken for the old ones.
local job, hist, recent, tenant_recent = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job_id, state, final, head, tail = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local progress, result, err, task, ts = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local limit, ttl, only_new = tonumber(ARGV[11]), tonumber(ARGV[12]), ARGV[13]
local chan_job, chan_all, recent_limit = ARGV[14], ARGV[15], tonumber(ARGV[16])
local event_id = ARGV[17]
local owner_tenant, owner_sub, tenant_chan, new_epoch = ARGV[18], ARGV[19], ARGV[20], ARGV[21]

-- A retry of the last event recorded (its reply was lost to a dropped connection) gets the
-- same seq back instead of a duplicate event.
if event_id ~= '' and redis.call('HGET', job, 'eid') == event_id then
  return tonumber(redis.call('HGET', job, 'seq'))
end
if only_new == '1' and redis.call('EXISTS', job) == 1 then
  return false
end
if redis.call('HGET', job, 'final') == '1' then
  return false
end

local seq = redis.call('HINCRBY', job, 'seq', 1)
local known = redis.call('HMGET', job, 'epoch', 'tenant')
local epoch, tenant = known[1], known[2]
if not epoch then
  epoch = new_epoch
  redis.call('HSET', job, 'epoch', epoch)
end
local event = head .. seq .. ',"epoch":"' .. epoch .. '"' .. tail
redis.call('HSET', job, 'state', state, 'final', final, 'updated', ts, 'event', event, 'eid', event_id)
-- progress is sticky (the last known step stays useful); result and error describe the
-- latest event only, so a SUCCESS after a RETRY does not keep showing the retry's error.
if progress ~= '' then redis.call('HSET', job, 'progress', progress) end
if result ~= '' then redis.call('HSET', job, 'result', result) else redis.call('HDEL', job, 'result') end
if err ~= '' then redis.call('HSET', job, 'error', err) else redis.call('HDEL', job, 'error') end
if task ~= '' then redis.call('HSETNX', job, 'task', task) end
-- The owner is set once, by whoever creates the job; nobody can take it over later.
if redis.call('HSETNX', job, 'created', ts) == 1 then
  redis.call('ZADD', recent, ts, job_id)
  redis.call('ZREMRANGEBYRANK', recent, 0, -(recent_limit + 1))
  if owner_tenant ~= '' then
    redis.call('HSET', job, 'tenant', owner_tenant, 'sub', owner_sub)
    redis.call('ZADD', tenant_recent, ts, job_id)
    redis.call('ZREMRANGEBYRANK', tenant_recent, 0, -(recent_limit + 1))
  end
end

redis.call('ZADD', hist, seq, event)
redis.call('ZREMRANGEBYRANK', hist, 0, -(limit + 1))
redis.call('EXPIRE', job, ttl)
redis.call('EXPIRE', hist, ttl)

if #KEYS >= 5 then
  local celery_value, celery_ttl = ARGV[22], tonumber(ARGV[23])
  if celery_ttl and celery_ttl > 0 then
    redis.call('SET', KEYS[5], celery_value, 'EX', celery_ttl)
  else
    redis.call('SET', KEYS[5], celery_value)
  end
  -- Celery's result consumer listens on the key's own channel.
  redis.call('PUBLISH', KEYS[5], celery_value)
end

redis.call('PUBLISH', chan_job, event)
redis.call('PUBLISH', chan_all, event)
if not tenant and owner_tenant ~= '' and redis.call('HGET', job, 'tenant') then
  tenant = owner_tenant  -- recorded by this very event, which created the job
end
if tenant then redis.call('PUBLISH', tenant_chan .. tenant, event) end
return seq
