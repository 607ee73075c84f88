#!lua name=celeriac_v1
-- celeriac Redis worker protocol, version 1. Loaded by the service at start-up
-- (FUNCTION LOAD REPLACE). Workers call one function per operation; each one is atomic,
-- so no order of calls can corrupt state. See docs/protocol.md, "Redis protocol".
--
-- Keys (T is the hash tag, "{celeriac}" by default, so a cluster keeps them in one slot):
--   T:ready:<queue>  ZSET  job ids ready to lease, score = (9 - priority)*1e13 + enqueue ms, lowest first
--   T:job:<id>       HASH  env (the job envelope, JSON), and while leased: token, worker,
--                          deadline (ms), cancel ("1" once cancellation was requested);
--                          after a report, until the service has applied it: done = "1";
--                          while an HTTP lease (granted in SQL) holds limit slots here:
--                          token = that lease's token, http = its grant ms
--   T:events         STREAM what workers did, consumed by the service into SQL
--   T:lease-seq      STRING counter for lease tokens
--   T:wake:<queue>   LIST   wake-up tokens: an idle worker BLPOPs these instead of polling
-- Flow control (docs/flow-control.md), written by the service from SQL:
--   T:flow           HASH   "synced" once the service wrote the rules; "paused:<queue>" = 1;
--                          "rule:<key>" = "max_running,rate_limit,period_ms" (empty: none)
--                          for limits, patterns ("rule:customer-*") and "rule:queue/<q>"
--   T:slots:<key>    HASH   job id -> lease token, for jobs leased here or over HTTP (the
--                          service's http_* functions) under that key; a slot whose job
--                          no longer holds that token is free
--   T:grants:<key>   ZSET   "<id>:<token>" scored by grant ms: the key's sliding window
--   T:http-slots     ZSET   "<id>|<token>|<queue>" of the HTTP leases holding slots here,
--                          scored by grant ms: what the service's repair pass checks
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

-- --- flow control ---------------------------------------------------------------------

-- The rule of a limit key: its own, else the longest pattern that prefixes it; nil: none.
local function rule_of(tag, key, cache)
  if cache[key] ~= nil then return cache[key] or nil end
  local text = redis.call('HGET', tag .. ':flow', 'rule:' .. key)
  if not text and string.sub(key, 1, 6) ~= 'queue/' then
    for i = #key, 0, -1 do
      local found = redis.call('HGET', tag .. ':flow', 'rule:' .. string.sub(key, 1, i) .. '*')
      if found then text = found; break end
    end
  end
  local rule = false
  if text then
    local max_running, rate, period = string.match(text, '^(%d*),(%d*),(%d*)$')
    rule = {max_running = tonumber(max_running), rate = tonumber(rate),
            period = tonumber(period)}
  end
  cache[key] = rule
  return rule or nil
end

-- Slots held now: leases granted here whose job still holds that token (a completed,
-- failed, released or reclaimed job's slot frees itself: its hash lost the token).
local function running(tag, key)
  local slots = tag .. ':slots:' .. key
  local held = redis.call('HGETALL', slots)
  local count = 0
  for i = 1, #held, 2 do
    if redis.call('HGET', tag .. ':job:' .. held[i], 'token') == held[i + 1] then
      count = count + 1
    else
      redis.call('HDEL', slots, held[i])
    end
  end
  return count
end

local function has_room(tag, key, rule, now)
  if rule.max_running and running(tag, key) >= rule.max_running then return false end
  if rule.rate then
    local grants = tag .. ':grants:' .. key
    redis.call('ZREMRANGEBYSCORE', grants, '-inf', now - rule.period)
    if redis.call('ZCARD', grants) >= rule.rate then return false end
  end
  return true
end

-- The limited keys of a job (its limits, then its queue's key) if every one has room;
-- false and the first key without room if one has none.
local function admit(tag, env, cache, now)
  local job = cjson.decode(env)
  local keys = {}
  if type(job.limits) == 'table' then
    for _, key in ipairs(job.limits) do keys[#keys + 1] = key end
  end
  keys[#keys + 1] = 'queue/' .. job.queue
  local limited = {}
  for _, key in ipairs(keys) do
    local rule = rule_of(tag, key, cache)
    if rule then
      if not has_room(tag, key, rule, now) then return false, key end
      limited[#limited + 1] = {key, rule}
    end
  end
  return limited
end

local function take_slots(tag, limited, id, token, now)
  for _, entry in ipairs(limited) do
    local key, rule = entry[1], entry[2]
    if rule.max_running then redis.call('HSET', tag .. ':slots:' .. key, id, token) end
    if rule.rate then
      redis.call('ZADD', tag .. ':grants:' .. key, now, id .. ':' .. token)
      redis.call('PEXPIRE', tag .. ':grants:' .. key, rule.period + 1000)
    end
  end
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
  local flow = tag .. ':flow'
  -- Until the service has written the rules (at its start, after a flush), a job that
  -- names limits is not leased here: a limit unknown to Redis must not read as none.
  local synced = redis.call('HEXISTS', flow, 'synced') == 1
  local now, rules, blocked = now_ms(), {}, {}
  -- Blocked jobs are looked at, then put back: bound the look per call.
  local budget = want * 4 + 32
  for i = 2, #keys do
    local queue = string.sub(keys[i], #tag + 8)
    local open = redis.call('HEXISTS', flow, 'paused:' .. queue) == 0
    while open and want > 0 and budget > 0 do
      local popped = redis.call('ZPOPMIN', keys[i], math.min(want, budget))
      if #popped == 0 then break end
      for j = 1, #popped, 2 do
        local id = popped[j]
        budget = budget - 1
        local job = tag .. ':job:' .. id
        local env = redis.call('HGET', job, 'env')
        -- No envelope: leased over HTTP, or reported; a token: leased already.
        if env and redis.call('HEXISTS', job, 'token') == 0 then
          local limited = false
          if synced then
            limited = admit(tag, env, rules, now)
          elseif not string.find(env, '"limits":[', 1, true) then
            limited = {}
          end
          if limited then
            redis.call('HSET', job, 'token', token, 'worker', worker, 'deadline', deadline)
            take_slots(tag, limited, id, token, now)
            redis.call('XADD', keys[1], '*', 'k', 'L', 'id', id, 't', token, 'w', worker,
              'ms', lease_ms)
            -- env is a JSON object: splice the lease in before its closing brace.
            out[#out + 1] = string.sub(env, 1, -2) .. ',"lease":{"token":"' .. token ..
              '","deadline_ms":' .. deadline .. '}}'
            want = want - 1
          else
            blocked[#blocked + 1] = {keys[i], popped[j + 1], id}
          end
        end
      end
    end
  end
  local held_back = {}
  for _, entry in ipairs(blocked) do  -- still ready: back where they were
    redis.call('ZADD', entry[1], entry[2], entry[3])
    held_back[entry[1]] = (held_back[entry[1]] or 0) + 1
  end
  -- Wake another worker only for jobs nobody has looked at yet: a queue whose rest is
  -- blocked wakes its workers when a slot frees (settle_wake), not in a loop.
  for i = 2, #keys do
    if redis.call('ZCARD', keys[i]) > (held_back[keys[i]] or 0) then wake(tag, keys[i]) end
  end
  return out
end

-- A settled job that held limit slots frees them: wake a worker of its queue, whose
-- blocked jobs may now have room.
local function settle_wake(job)
  local env = redis.call('HGET', job, 'env')
  if env and string.find(env, '"limits":[', 1, true) then
    local tag = tag_of(job)
    local queue = cjson.decode(env).queue
    if redis.call('ZCARD', tag .. ':ready:' .. queue) > 0 then
      wake(tag, tag .. ':ready:' .. queue)
    end
  end
end

-- A reported job keeps a tombstone until the service has applied the report to SQL, so
-- that the service's reconciler, which trusts SQL, does not offer the job again meanwhile.
local function tombstone(job)
  settle_wake(job)
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

-- The event of a report, with the attempt's logs when the worker sent any (an optional
-- last argument: docs/operations.md, "Per-attempt job logs").
local function report_event(stream, fields, logs)
  if logs ~= nil and logs ~= '' then
    fields[#fields + 1] = 'l'
    fields[#fields + 1] = logs
  end
  redis.call('XADD', stream, '*', unpack(fields))
end

-- KEYS: T:events, T:job:<id>    ARGV: version, id, token, result JSON[, logs]
local function complete(keys, args)
  local bad = check_version(args[1]) or leased_job(keys[2], args[3]); if bad then return bad end
  tombstone(keys[2])
  report_event(keys[1], {'k', 'C', 'id', args[2], 't', args[3], 'r', args[4]}, args[5])
  return 'OK'
end

-- KEYS: T:events, T:job:<id>
-- ARGV: version, id, token, error JSON {type, message, traceback?}, retry (1/0),
--       retry_in s or ''[, logs]
local function fail(keys, args)
  local bad = check_version(args[1]) or leased_job(keys[2], args[3]); if bad then return bad end
  tombstone(keys[2])
  report_event(keys[1], {'k', 'F', 'id', args[2], 't', args[3], 'e', args[4],
    'retry', args[5], 'in', args[6]}, args[7])
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

-- --- HTTP leases under flow control (called by the service only, never by workers) ---
-- An HTTP lease is granted in SQL; when its job counts against limit keys, the service
-- asks here first, inside its SQL transaction, so that Redis arbitrates every slot of a
-- key, whoever leases (docs/flow-control.md, "HTTP and Redis workers on one key").

-- KEYS: T:flow    ARGV: version, token, then per job: id, {"queue":…,"limits":[…]}
-- Per job, in order: '' granted (its slots are taken and its hash holds the token, which
-- the lease function and pop_ready skip), else why not: the key without room, '!' (a
-- Redis worker holds or has just reported the job), '?' (the rules are not synced yet).
local function http_grant(keys, args)
  local bad = check_version(args[1]); if bad then return bad end
  local tag, token = tag_of(keys[1]), args[2]
  local synced = redis.call('HEXISTS', keys[1], 'synced') == 1
  local now, rules, out = now_ms(), {}, {}
  for i = 3, #args, 2 do
    local id, env = args[i], args[i + 1]
    local job = tag .. ':job:' .. id
    local answer = ''
    if not synced then
      answer = '?'
    elseif redis.call('HEXISTS', job, 'token') == 1 or redis.call('HEXISTS', job, 'done') == 1 then
      answer = '!'
    else
      local limited, full = admit(tag, env, rules, now)
      if limited then
        take_slots(tag, limited, id, token, now)
        redis.call('HSET', job, 'token', token, 'http', now)
        redis.call('PERSIST', job)  -- the slot lasts as long as the lease, not a TTL
        redis.call('ZADD', tag .. ':http-slots', now,
          id .. '|' .. token .. '|' .. cjson.decode(env).queue)
      else
        answer = full
      end
    end
    out[#out + 1] = answer
  end
  return out
end

-- KEYS: T:flow    ARGV: version, token, then per job: id, {"queue":…,"limits":[…]}
-- Undoes http_grant for a SQL transaction that did not commit.
local function http_undo(keys, args)
  local bad = check_version(args[1]); if bad then return bad end
  local tag, token = tag_of(keys[1]), args[2]
  for i = 3, #args, 2 do
    local id, job = args[i], cjson.decode(args[i + 1])
    local hash = tag .. ':job:' .. id
    redis.call('ZREM', tag .. ':http-slots', id .. '|' .. token .. '|' .. job.queue)
    if redis.call('HGET', hash, 'token') == token then
      redis.call('HDEL', hash, 'token', 'http')
      local names = {}
      if type(job.limits) == 'table' then
        for _, key in ipairs(job.limits) do names[#names + 1] = key end
      end
      names[#names + 1] = 'queue/' .. job.queue
      for _, key in ipairs(names) do
        if redis.call('HGET', tag .. ':slots:' .. key, id) == token then
          redis.call('HDEL', tag .. ':slots:' .. key, id)
        end
        redis.call('ZREM', tag .. ':grants:' .. key, id .. ':' .. token)
      end
    end
  end
  return 'OK'
end

-- KEYS: T:flow    ARGV: version, tombstone seconds, then per lease: id, token, queue
-- Leases that ended in SQL (settled, reclaimed): a hash still holding that token frees its
-- slots (tombstone, as a Redis worker's report leaves) and wakes a worker of the queue,
-- whose blocked jobs may have room now. Any other hash (re-published, leased again) is
-- left alone. Returns how many were freed.
local function http_free(keys, args)
  local bad = check_version(args[1]); if bad then return bad end
  local tag, freed = tag_of(keys[1]), 0
  for i = 3, #args, 3 do
    local job = tag .. ':job:' .. args[i]
    redis.call('ZREM', tag .. ':http-slots', args[i] .. '|' .. args[i + 1] .. '|' .. args[i + 2])
    if redis.call('HGET', job, 'token') == args[i + 1] then
      redis.call('DEL', job)
      redis.call('HSET', job, 'done', '1')
      redis.call('EXPIRE', job, tonumber(args[2]))
      local ready = tag .. ':ready:' .. args[i + 2]
      if redis.call('ZCARD', ready) > 0 then wake(tag, ready) end
      freed = freed + 1
    end
  end
  return freed
end

-- KEYS: T:flow    ARGV: version, tombstone seconds, job ids
-- Jobs just leased over HTTP no longer need their envelopes. A job whose hash holds its
-- HTTP lease's slots keeps its token (until http_free); any other becomes a short-lived
-- tombstone, so that a reconcile pass that read SQL a moment earlier does not offer it.
local function http_leased(keys, args)
  local bad = check_version(args[1]); if bad then return bad end
  local tag = tag_of(keys[1])
  for i = 3, #args do
    local job = tag .. ':job:' .. args[i]
    if redis.call('HEXISTS', job, 'http') == 1 then
      redis.call('HDEL', job, 'env')
    else
      redis.call('DEL', job)
      redis.call('HSET', job, 'done', '1')
      redis.call('EXPIRE', job, tonumber(args[2]))
    end
  end
  return 'OK'
end

redis.register_function('celeriac_v1_lease', lease)
redis.register_function('celeriac_v1_heartbeat', heartbeat)
redis.register_function('celeriac_v1_complete', complete)
redis.register_function('celeriac_v1_fail', fail)
redis.register_function('celeriac_v1_release', release)
redis.register_function('celeriac_v1_http_grant', http_grant)
redis.register_function('celeriac_v1_http_undo', http_undo)
redis.register_function('celeriac_v1_http_free', http_free)
redis.register_function('celeriac_v1_http_leased', http_leased)
