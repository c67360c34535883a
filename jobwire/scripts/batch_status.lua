-- Status of many jobs in one command: for each job hash in KEYS, its state, seq, final
-- flag, owner tenant and epoch (nil state = never seen). Returned flat, five per job.
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 'state', 'seq', 'final', 'tenant', 'epoch')
  for j = 1, 5 do out[#out + 1] = v[j] end
end
return out
