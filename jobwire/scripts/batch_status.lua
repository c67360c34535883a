#!lua flags=no-writes,allow-cross-slot-keys
-- Status of many jobs in one command: for each job hash named in ARGV, its state, seq,
-- final flag, owner tenant and epoch (nil state = never seen). Returned flat, five per job.
--
-- The hashes come in ARGV, not KEYS: on a cluster they span many slots of one node, which
-- Redis refuses for declared keys but allows a script flagged allow-cross-slot-keys to
-- read. The server sends one call per node, with the ids that node holds.
local out = {}
for _, key in ipairs(ARGV) do
  local v = redis.call('HMGET', key, 'state', 'seq', 'final', 'tenant', 'epoch')
  for j = 1, 5 do out[#out + 1] = v[j] end
end
return out
