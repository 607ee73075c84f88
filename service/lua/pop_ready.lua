-- celeriac pop_ready, protocol v1 (used by the service for HTTP leases)
-- KEYS: the ready sets of the requested queues, in order.  ARGV: max_jobs, hash tag.
-- Pops up to max_jobs ids, draining the first queue before touching the next, lowest
-- score first (score = (9 - priority) * 1e13 + enqueue ms; ties pop in id order, oldest first).
-- Skips ids that a Redis worker holds a lease on (their job hash has a token) or has
-- reported on (a "done" tombstone until the service applies the report).
-- Returns a flat list of (ready set key, id, score): what the service needs to put an
-- id back where it was if SQL cannot decide on it.
local want = tonumber(ARGV[1])
local tag = ARGV[2]
local out = {}
for _, key in ipairs(KEYS) do
  while want > 0 do
    local popped = redis.call('ZPOPMIN', key, want)
    if #popped == 0 then break end
    for i = 1, #popped, 2 do
      local id = popped[i]
      local job = tag .. ':job:' .. id
      if redis.call('HEXISTS', job, 'token') == 0 and redis.call('HEXISTS', job, 'done') == 0 then
        out[#out + 1] = key
        out[#out + 1] = id
        out[#out + 1] = popped[i + 1]
        want = want - 1
      end
    end
  end
end
return out
