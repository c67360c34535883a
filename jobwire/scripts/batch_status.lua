#!lua flags=no-writes,allow-cross-slot-keys
-- Status of many jobs in one command: for each job, its state, seq, final flag, owner
-- tenant and epoch (false where unset; a false state = never seen), as one JSON array of
-- five-element arrays, in the order asked.
--
-- ARGV: the job hash's name before and after the id, then the ids' key forms (`key_id`)
-- separated by spaces (they never hold one). One argument and one JSON reply, not a
-- thousand of each: packing and parsing those was most of a large batch's cost.
--
-- The hashes are not declared as KEYS: on a cluster they span many slots of one node,
-- which Redis refuses for declared keys but allows a script flagged allow-cross-slot-keys
-- to read. The server sends one call per node, with the ids that node holds.
local head, tail = ARGV[1], ARGV[2]
local out = {}
for id in string.gmatch(ARGV[3], '%S+') do
  out[#out + 1] = redis.call('HMGET', head .. id .. tail, 'state', 'seq', 'final', 'tenant', 'epoch')
end
if #out == 0 then
  return '[]'  -- cjson would write an empty table as {}
end
return cjson.encode(out)
