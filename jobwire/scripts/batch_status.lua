-- Status of many jobs in one command: for each job hash in KEYS, its state, seq and
-- final flag (nil state = never seen). Returned flat: state1, seq1, final1, state2, ...
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 'state', 'seq', 'final')
  out[#out + 1] = v[1]
  out[#out + 1] = v[2]
  out[#out + 1] = v[3]
end
return out
