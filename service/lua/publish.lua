-- celeriac publish, protocol v1 (used by the service after a commit made jobs ready)
-- ARGV: tag, then one group of four per job: id, score, queue, envelope.
-- Makes each job leasable by Redis workers and HTTP leases alike: its envelope (clearing
-- any old lease fields, which SQL has ended), its ready-set entry, and one wake-up token
-- per queue for idle Redis workers (at most 64 kept). One command for a whole batch: the
-- same writes as one HDEL, HSET and ZADD per job, without a reply for each.
local tag = ARGV[1]
local queues = {}
for i = 2, #ARGV, 4 do
  local id, score, queue, env = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local job = tag .. ':job:' .. id
  redis.call('HDEL', job, 'token', 'worker', 'deadline', 'cancel', 'done', 'http')
  redis.call('HSET', job, 'env', env)
  redis.call('ZADD', tag .. ':ready:' .. queue, score, id)
  queues[queue] = true
end
for queue in pairs(queues) do
  redis.call('LPUSH', tag .. ':wake:' .. queue, '1')
  redis.call('LTRIM', tag .. ':wake:' .. queue, 0, 63)
end
return (#ARGV - 1) / 4
