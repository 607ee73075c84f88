#!lua name=celeriac_v1
-- celeriac Redis worker protocol, version 1. Loaded by the service at start-up
-- (FUNCTION LOAD REPLACE). Workers call one function per operation; each one is atomic,
-- so no order of calls can corrupt state. See docs/protocol.md, "Redis protocol".
--
-- Keys (T is the hash tag, "{celeriac}" by default, so a cluster keeps them in one slot):
--   T:ready:<queue>  ZSET  job ids ready to lease, score = (9 - priority)*1e13 + enqueue ms, lowest first
--   T:job:<id>       HASH  env (the job envelope, JSON), and while leased: token, worker,
--                          deadline (ms), cancel ("1" once cancellation was requested);
--                          after a report, until the service has applied it: done = "1"
--   T:events         STREAM what workers did, consumed by the service into SQL
--   T:lease-seq      STRING counter for lease tokens
--   T:wake:<queue>   LIST   wake-up tokens: an idle worker BLPOPs these instead of polling
-- SQL remains the record: these functions only hand out and fence leases; the service
-- applies every event to SQL, where a stale report is rejected a second time.

local PROTOCOL = '1'

local function check_version(v)
  if v ~= PROTOCOL then
    return redis.error_reply('VERSION celeriac Redis protocol ' .. PROTOCOL ..
      ' is served; the worker speaks ' .. tostring(v))
  end
  return nil
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function tag_of(key)
  return string.match(key, '^({[^}]*})')
end

-- Wake one more idle worker while a queue still has jobs: the chain continues until the
-- ready set is empty or no worker is waiting. The list is trimmed so tokens nobody takes
-- cannot pile up.
local function wake(tag, ready_key)
  local queue = string.sub(ready_key, #tag + 8)
  redis.call('LPUSH', tag .. ':wake:' .. queue, '1')
  redis.call('LTRIM', tag .. ':wake:' .. queue, 0, 63)
end

-- KEYS: T:events, T:ready:<q1>, T:ready:<q2>, ...   (queues in priority order)
-- ARGV: version, worker, max_jobs, lease_ms
-- Returns: array of JSON objects, the envelope plus "lease": {"token", "deadline_ms"}
local function lease(keys, args)
  local bad = check_version(args[1]); if bad then return bad end
  local worker, want, lease_ms = args[2], tonumber(args[3]), tonumber(args[4])
  local tag = tag_of(keys[1])
  local deadline = now_ms() + lease_ms
  local token = 'r' .. redis.call('INCR', tag .. ':lease-seq') .. '.' .. deadline
  local out = {}
  for i = 2, #keys do
    while want > 0 do
      local popped = redis.call('ZPOPMIN', keys[i], want)
      if #popped == 0 then break end
      for j = 1, #popped, 2 do
        local id = popped[j]
        local job = tag .. ':job:' .. id
        local env = redis.call('HGET', job, 'env')
        -- No envelope: leased over HTTP, or reported; a token: leased already.
        if env and redis.call('HEXISTS', job, 'token') == 0 then
          redis.call('HSET', job, 'token', token, 'worker', worker, 'deadline', deadline)
          redis.call('XADD', keys[1], '*', 'k', 'L', 'id', id, 't', token, 'w', worker,
            'ms', lease_ms)
          -- env is a JSON object: splice the lease in before its closing brace.
          out[#out + 1] = string.sub(env, 1, -2) .. ',"lease":{"token":"' .. token ..
            '","deadline_ms":' .. deadline .. '}}'

          want = want - 1
        end
      end
    end
  end
  for i = 2, #keys do
    if redis.call('ZCARD', keys[i]) > 0 then wake(tag, keys[i]) end
  end
  return out
end

-- A reported job keeps a tombstone until the service has applied the report to SQL, so
-- that the service's reconciler, which trusts SQL, does not offer the job again meanwhile.
local function tombstone(job)
  redis.call('DEL', job)
  redis.call('HSET', job, 'done', '1')
  redis.call('EXPIRE', job, 3600)
end

local function leased_job(job, token)
  local current = redis.call('HGET', job, 'token')
  if current == false or current ~= token then
    return redis.error_reply('STALE the lease token is no longer valid; drop the job')
  end
  return nil
end

-- KEYS: T:events, T:job:<id>    ARGV: version, id, token, lease_ms, progress JSON or ''
-- Returns: {deadline_ms, cancel_requested (0/1)}
local function heartbeat(keys, args)
  local bad = check_version(args[1]) or leased_job(keys[2], args[3]); if bad then return bad end
  local deadline = now_ms() + tonumber(args[4])
  redis.call('HSET', keys[2], 'deadline', deadline)
  redis.call('XADD', keys[1], '*', 'k', 'H', 'id', args[2], 't', args[3], 'ms', args[4],
    'p', args[5])
  local cancel = redis.call('HGET', keys[2], 'cancel') == '1' and 1 or 0
  return {deadline, cancel}
end

-- KEYS: T:events, T:job:<id>    ARGV: version, id, token, result JSON
local function complete(keys, args)
  local bad = check_version(args[1]) or leased_job(keys[2], args[3]); if bad then return bad end
  tombstone(keys[2])
  redis.call('XADD', keys[1], '*', 'k', 'C', 'id', args[2], 't', args[3], 'r', args[4])
  return 'OK'
end

-- KEYS: T:events, T:job:<id>
-- ARGV: version, id, token, error JSON {type, message, traceback?}, retry (1/0), retry_in s or ''
local function fail(keys, args)
  local bad = check_version(args[1]) or leased_job(keys[2], args[3]); if bad then return bad end
  tombstone(keys[2])
  redis.call('XADD', keys[1], '*', 'k', 'F', 'id', args[2], 't', args[3], 'e', args[4],
    'retry', args[5], 'in', args[6])
  return 'OK'
end

-- KEYS: T:events, T:job:<id>    ARGV: version, id, token
-- Gives back a job the worker has not started; it is not counted as an attempt.
local function release(keys, args)
  local bad = check_version(args[1]) or leased_job(keys[2], args[3]); if bad then return bad end
  tombstone(keys[2])
  redis.call('XADD', keys[1], '*', 'k', 'R', 'id', args[2], 't', args[3])
  return 'OK'
end

redis.register_function('celeriac_v1_lease', lease)
redis.register_function('celeriac_v1_heartbeat', heartbeat)
redis.register_function('celeriac_v1_complete', complete)
redis.register_function('celeriac_v1_fail', fail)
redis.register_function('celeriac_v1_release', release)
