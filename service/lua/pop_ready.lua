-- celeriac pop_ready, protocol v1
-- Pop up to ARGV[1] job ids from the ready sets in KEYS, in the order given: the first
-- queue is drained before the next is touched. Within a set, the highest score first
-- (score = priority * 1e13 + (1e13 - enqueue milliseconds): priority, then oldest).
local want = tonumber(ARGV[1])
local out = {}
for _, key in ipairs(KEYS) do
  if want <= 0 then break end
  local popped = redis.call('ZPOPMAX', key, want)
  for i = 1, #popped, 2 do
    out[#out + 1] = popped[i]
  end
  want = want - #popped / 2
end
return out
