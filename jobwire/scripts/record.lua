-- Record one job event: allocate its seq, update the job hash, append to the history,
-- optionally write Celery's own result meta, and publish -- all atomically, in the one
-- round trip the caller pays. Every key is in the job's hash slot, so this runs unchanged
-- on Redis Cluster (the recent-jobs indexes are written by the caller, once per job).
--
-- Returns {seq, created (1/0), parent, role}: the job's parent (a group or chord it belongs
-- to) and its role there, when this event is final, else ''. Returns false when the event
-- is refused: the job is already final, only_if_new was asked and the job exists, or
-- dedupe was asked and the job recorded this event_id already.
--
-- KEYS[1] job hash   KEYS[2] history zset (event by seq)
-- KEYS[3] progress zset: the seqs in the history that are progress, i.e. trimmable
-- KEYS[4] event-id zset: the last 256 event ids recorded with dedupe
-- KEYS[5] (optional) Celery result key, written exactly as Celery's Redis backend does
--
-- ARGV, by position. The callers build it from jobwire/record.py, whose ARGV tuple writes
-- this order once; the locals below carry the same names, and tests/test_record_contract.py
-- reads both this list and the locals' ARGV[n] and holds them to that tuple.
--   ARGV[1]  job_id
--   ARGV[2]  state
--   ARGV[3]  final          '1'/'0'
--   ARGV[4]  head           the event's JSON up to its seq
--   ARGV[5]  tail           the event's JSON after its seq
--   ARGV[6]  progress       JSON, or '' for none
--   ARGV[7]  result         JSON, or ''
--   ARGV[8]  err            JSON, or ''
--   ARGV[9]  task           the task's name, or ''
--   ARGV[10] ts             seconds since the epoch, as a JSON number
--   ARGV[11] limit          history length past which progress is trimmed
--   ARGV[12] ttl            seconds every key lives after the last event
--   ARGV[13] only_new       '1'/'0': refuse the event if the job exists
--   ARGV[14] chan_job       the job's channel
--   ARGV[15] chan_all       the all-jobs channel
--   ARGV[16] event_id
--   ARGV[17] owner_tenant   the owner ('' for none), set only when the job is created
--   ARGV[18] owner_sub
--   ARGV[19] tenant_chan    prefix of the tenant channels
--   ARGV[20] new_epoch      the epoch, if this event creates the job record
--   ARGV[21] sharded        '1'/'0': publish on the job's shard channel
--   ARGV[22] history_max    history length past which even transitions go
--   ARGV[23] dedupe         '1'/'0': refuse an event id among the job's last 256
--   ARGV[24] parent         the group or chord ('' for none), set only when created
--   ARGV[25] role           'child' or 'callback'
--   ARGV[26] outcome        'ok'/'failed' (a child's end counted in this group), or ''
--   ARGV[27] celery_value   only with KEYS[5]: Celery's encoded result meta
--   ARGV[28] celery_ttl     only with KEYS[5]: its expiry in seconds, 0 for none
--
-- outcome ('ok'/'failed', else '') makes this event a group's or chord's aggregate:
-- the job's done or failed counter goes up by one, and the script writes the event itself
-- from the counters, so counts in the stream only rise however children race: RUNNING
-- with {done, failed, total, percent}; when every child is in, a group's final SUCCESS
-- (or FAILURE naming the failed count), a chord's CALLBACK (its callback's end follows).
--
-- The epoch names this incarnation of the job's stream: set when the job record is created,
-- so a record recreated after its history was lost (a Redis restart without persistence)
-- gets a new one, and its seqs (starting at 1 again) cannot be mistaken for the old ones.
--
-- History keeps transitions and trims progress. An event is *progress* when it repeats the
-- previous event's state and is not final; every other event is a *transition*. Past
-- history_limit events the oldest progress events go (the newest of each state always
-- stays), so a client resuming from any seq still gets every transition and the latest
-- progress of every state it passed through. Only past history_max events
-- (a job that changes state without end) do the oldest events go whatever they are, and
-- `lost` records the highest seq gone that way, so readers can say it was a real gap.
local job, hist, prog = KEYS[1], KEYS[2], KEYS[3]
local job_id, state, final, head, tail = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local progress, result, err, task, ts = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local limit, ttl, only_new = tonumber(ARGV[11]), tonumber(ARGV[12]), ARGV[13]
local chan_job, chan_all, event_id = ARGV[14], ARGV[15], ARGV[16]
local owner_tenant, owner_sub, tenant_chan, new_epoch = ARGV[17], ARGV[18], ARGV[19], ARGV[20]
local sharded, history_max = ARGV[21], tonumber(ARGV[22])
local dedupe, parent, role, outcome = ARGV[23], ARGV[24], ARGV[25], ARGV[26]

-- A retry of the last event recorded (its reply was lost to a dropped connection) gets the
-- same seq back instead of a duplicate event.
local known = redis.call('HMGET', job, 'eid', 'seq', 'final', 'epoch', 'tenant', 'state', 'parent', 'role')
if event_id ~= '' and known[1] == event_id then
  return {tonumber(known[2]), 0, '', ''}
end
if dedupe == '1' and redis.call('ZSCORE', KEYS[4], event_id) then
  return false
end
if only_new == '1' and known[2] then
  return false
end
if known[3] == '1' then
  return false
end

local aggregate, kind = nil, nil
if outcome ~= '' then
  local done = redis.call('HINCRBY', job, outcome == 'ok' and 'done' or 'failed', 1)
  local counts = redis.call('HMGET', job, 'done', 'failed', 'total', 'kind')
  local d, f, t = tonumber(counts[1] or 0), tonumber(counts[2] or 0), tonumber(counts[3] or 0)
  kind = counts[4] or 'group'
  local percent = t > 0 and math.floor((d + f) * 10000 / t) / 100 or 100
  aggregate = '{"done":' .. d .. ',"failed":' .. f .. ',"total":' .. t .. ',"percent":' .. percent .. '}'
  progress, result, err, final, state = aggregate, '', '', '0', 'RUNNING'
  if d + f >= t then
    if kind == 'chord' then
      state = 'CALLBACK'
    elseif f == 0 then
      state, final, result = 'SUCCESS', '1', '{"children":' .. t .. '}'
    else
      state, final = 'FAILURE', '1'
      err = '{"type":"GroupError","message":"' .. f .. ' of ' .. t .. ' children failed"}'
    end
  end
end

if not known[2] and parent ~= '' then
  known[7], known[8] = parent, role  -- this event creates a group's child
end
local seq = redis.call('HINCRBY', job, 'seq', 1)
local epoch, tenant, previous = known[4], known[5], known[6]
if not epoch then
  epoch = new_epoch
  redis.call('HSET', job, 'epoch', epoch)
end
local event
if aggregate then
  event = head .. seq .. ',"epoch":"' .. epoch .. '","state":"' .. state .. '","progress":' .. aggregate
    .. ',"ts":' .. ts .. ',"final":' .. (final == '1' and 'true' or 'false') .. ',"task":"' .. kind .. '"'
    .. (result ~= '' and (',"result":' .. result) or '') .. (err ~= '' and (',"error":' .. err) or '') .. '}'
else
  -- A group's child says so in every event: dashboards list the group, not its children.
  local of = ''
  if known[7] then
    -- any id Celery takes: quotes, backslashes and control characters escaped for JSON
    local escaped = string.gsub(known[7], '[%c"\\]', function(c) return string.format('\\u%04x', string.byte(c)) end)
    of = ',"parent":"' .. escaped .. '"'
  end
  event = head .. seq .. ',"epoch":"' .. epoch .. '"' .. of .. tail
end
if dedupe == '1' then
  redis.call('ZADD', KEYS[4], seq, event_id)
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -257)
  redis.call('EXPIRE', KEYS[4], ttl)
end
redis.call('HSET', job, 'state', state, 'final', final, 'updated', ts, 'event', event, 'eid', event_id)
-- progress is sticky (the last known step stays useful); result and error describe the
-- latest event only, so a SUCCESS after a RETRY does not keep showing the retry's error.
if progress ~= '' then redis.call('HSET', job, 'progress', progress) end
if result ~= '' then redis.call('HSET', job, 'result', result) else redis.call('HDEL', job, 'result') end
if err ~= '' then redis.call('HSET', job, 'error', err) else redis.call('HDEL', job, 'error') end
if task ~= '' then redis.call('HSETNX', job, 'task', task) end
-- The owner is set once, by whoever creates the job; nobody can take it over later. The
-- worker names the owner with every event, so one that recreates a lost record restores it.
local created = 0
if redis.call('HSETNX', job, 'created', ts) == 1 then
  created = 1
  if owner_tenant ~= '' then
    redis.call('HSET', job, 'tenant', owner_tenant, 'sub', owner_sub)
    tenant = owner_tenant
  end
  if parent ~= '' then
    redis.call('HSET', job, 'parent', parent, 'role', role)
  end
end

redis.call('ZADD', hist, seq, event)
if final ~= '1' and previous == state then
  redis.call('ZADD', prog, seq, seq)
elseif previous then
  -- The last event of the previous state stays: a run's newest progress is never trimmed,
  -- so an event standing for trimmed ones always stands for ones of its own state.
  redis.call('ZREM', prog, seq - 1)
end
local over = redis.call('ZCARD', hist) - limit
if over > 0 then
  local spare = redis.call('ZCARD', prog) - 1
  if spare > 0 then
    local gone = redis.call('ZPOPMIN', prog, math.min(over, spare))
    for i = 1, #gone, 2 do
      redis.call('ZREMRANGEBYSCORE', hist, gone[i], gone[i])
    end
  end
  local beyond = redis.call('ZCARD', hist) - history_max
  if beyond > 0 then
    local last_gone = redis.call('ZRANGE', hist, beyond - 1, beyond - 1, 'WITHSCORES')[2]
    redis.call('ZREMRANGEBYRANK', hist, 0, beyond - 1)
    redis.call('ZREMRANGEBYSCORE', prog, '-inf', last_gone)
    redis.call('HSET', job, 'lost', last_gone)
  end
end
redis.call('EXPIRE', job, ttl)
redis.call('EXPIRE', hist, ttl)
redis.call('EXPIRE', prog, ttl)

if #KEYS >= 5 then
  local celery_value, celery_ttl = ARGV[27], tonumber(ARGV[28])
  if celery_ttl and celery_ttl > 0 then
    redis.call('SET', KEYS[5], celery_value, 'EX', celery_ttl)
  else
    redis.call('SET', KEYS[5], celery_value)
  end
  -- Celery's result consumer listens on the key's own channel.
  redis.call('PUBLISH', KEYS[5], celery_value)
end

-- A job's own channel is in its slot: on a cluster it is a shard channel, so only the
-- shard that holds the job carries its events. The all-jobs and tenant channels span
-- every job, so they stay cluster-wide.
if sharded == '1' then
  redis.call('SPUBLISH', chan_job, event)
else
  redis.call('PUBLISH', chan_job, event)
end
redis.call('PUBLISH', chan_all, event)
if tenant then redis.call('PUBLISH', tenant_chan .. tenant, event) end
if final == '1' then
  return {seq, created, known[7] or '', known[8] or ''}
end
return {seq, created, '', ''}
