-- celeriac missing, protocol v1 (used by the service's reconciler)
-- ARGV: tag, then pairs id, queue. Returns the ids that the index has lost: not in their
-- queue's ready set, not leased by a Redis worker, not awaiting the service (tombstone).
-- Lets the reconciler load envelopes only for what it must re-add.
local tag = ARGV[1]
local lost = {}
for i = 2, #ARGV, 2 do
  local id, queue = ARGV[i], ARGV[i + 1]
  local job = tag .. ':job:' .. id
  if not redis.call('ZSCORE', tag .. ':ready:' .. queue, id)
      and redis.call('HEXISTS', job, 'token') == 0
      and redis.call('HEXISTS', job, 'done') == 0 then
    lost[#lost + 1] = id
  end
end
return lost
