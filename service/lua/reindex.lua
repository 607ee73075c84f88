-- celeriac reindex, protocol v1 (used by the service's reconciler)
-- ARGV: tag, then one group of four per job: id, score, queue, envelope ('' for none).
-- Re-adds queued jobs that the index lost, without touching a job a Redis worker holds a
-- lease on (a token in its hash), nor one whose worker's report the service has not applied
-- yet (a "done" tombstone): reconciling must never end a live lease or rerun a finished job.
local tag = ARGV[1]
local added = 0
for i = 2, #ARGV, 4 do
  local id, score, queue, env = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local job = tag .. ':job:' .. id
  if redis.call('HEXISTS', job, 'token') == 0 and redis.call('HEXISTS', job, 'done') == 0 then
    if env ~= '' then redis.call('HSETNX', job, 'env', env) end
    redis.call('ZADD', tag .. ':ready:' .. queue, score, id)
    redis.call('LPUSH', tag .. ':wake:' .. queue, '1')
    redis.call('LTRIM', tag .. ':wake:' .. queue, 0, 63)
    added = added + 1
  end
end
return added
