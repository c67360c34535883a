-- Status of many jobs in one command: for each job hash in KEYS, its state, seq, final
-- flag and owner tenant (nil state = never seen). Returned flat: state1, seq1, final1,
-- tenant1, state2, ...
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 'state', 'seq', 'final', 'tenant')
  out[#out + 1] = v[1]
  out[#out + 1] = v[2]
  out[#out + 1] = v[3]
  out[#out + 1] = v[4]
end
return out
