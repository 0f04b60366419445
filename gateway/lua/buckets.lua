-- Token buckets: one decision over one or more buckets, atomically, on the server's clock.
-- The arithmetic mirrors gateway/buckets.py step by step; tests compare the two.
--
-- (After prelude.lua: clock, num, MARGIN.)
-- KEYS: one hash per bucket (l = level, t = time of that level, in seconds), all sharing
--       one hash tag so that the script runs unchanged on Redis Cluster.
-- ARGV: mode ("admit", "admit+slot", "admit+budget", "admit+slot+budget", "charge",
--       "peek"), now ("" = the server's TIME; tests pass a clock), then per bucket:
--       capacity, rate (tokens per second), amount (admit: the cost, 0 meaning "only
--       require the level above 0"; charge: tokens to take).
-- "admit+slot" also takes one in-flight slot (slots.lua's "acquire", in the same step):
--       its KEYS end with the slot set, its ARGV with member, limit, ttl seconds. The
--       call is admitted only if both have room; a full slot set refuses first.
-- "+budget" also requires a running total (totals.lua's) below a limit, before all else:
--       its KEYS end with the total and its mark, its ARGV with the limit (an integer in
--       decimal) and the mark's ttl seconds. An unset mark is set, and the answer says so:
--       its caller is to raise the total to the records' figure (LocalStore.admit).
-- "charge" may end its ARGV with a floor, a channel and a message: the message is
--       published when the level after the charge is at or below the floor (workers
--       holding leases of the key, leases.py, then stop trusting their view of it).
-- Returns strings (doubles survive as "%.17g"):
--   admit: {allowed (1|0), refused (1-based bucket, #buckets + 1 for the slots,
--           #buckets + 2 for the budget, 0 if none), wait seconds, levels...,
--           and with a budget the total read and 1 if the mark was set now, else 0}
--   charge: {level}   peek: {levels...}
local mode = ARGV[1]
local now = clock(ARGV[2])
local with_slot = mode == 'admit+slot' or mode == 'admit+slot+budget'
local with_budget = mode == 'admit+budget' or mode == 'admit+slot+budget'
local n = #KEYS
if with_slot then
  n = n - 1
end
if with_budget then
  n = n - 2
end

-- buckets.refill: a missing bucket is full; time never runs back.
local levels, stamps, caps, rates, amounts = {}, {}, {}, {}, {}
for i = 1, n do
  local cap, rate = tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  caps[i], rates[i], amounts[i] = cap, rate, tonumber(ARGV[3 * i + 2])
  local held = redis.call('HMGET', KEYS[i], 'l', 't')
  local level, stamp = tonumber(held[1]), tonumber(held[2])
  if level == nil or stamp == nil then
    level, stamp = cap, now
  end
  if now > stamp then
    level = level + (now - stamp) * rate
    stamp = now
  end
  if level > cap then
    level = cap
  end
  levels[i], stamps[i] = level, stamp
end

-- buckets.lifetime: keep a bucket until it would be full again, plus a margin.
local function store(i)
  redis.call('HSET', KEYS[i], 'l', num(levels[i]), 't', num(stamps[i]))
  local ms = math.ceil(((caps[i] - levels[i]) / rates[i] + MARGIN) * 1000)
  redis.call('PEXPIRE', KEYS[i], ms)
end

if mode == 'peek' then
  local out = {}
  for i = 1, n do
    out[i] = num(levels[i])
  end
  return out
end

if mode == 'charge' then
  -- buckets.charge: a debt is kept; a refund never fills past capacity.
  levels[1] = levels[1] - amounts[1]
  if levels[1] > caps[1] then
    levels[1] = caps[1]
  end
  store(1)
  if ARGV[6] and levels[1] <= tonumber(ARGV[6]) then
    redis.call('PUBLISH', ARGV[7], ARGV[8])
  end
  return {num(levels[1])}
end

local function verdict(allowed, refused, wait, spent, seed)
  local out = {tostring(allowed), tostring(refused), num(wait)}
  for i = 1, n do
    out[3 + i] = num(levels[i])
  end
  if spent then
    out[4 + n] = spent
    out[5 + n] = seed
  end
  return out
end

-- LocalStore.admit: a budget spent refuses first, then a full slot set, taking nothing.
local spent, seed
if with_budget then
  local last = 3 * n + 3
  if with_slot then
    last = last + 3
  end
  spent, seed = redis.call('GET', KEYS[#KEYS - 1]) or '0', '0'
  local ms = math.ceil(tonumber(ARGV[last + 1]) * 1000)
  if redis.call('SET', KEYS[#KEYS], '1', 'NX', 'PX', ms) then
    seed = '1'
  end
  if not below(spent, ARGV[last]) then
    return verdict(0, n + 2, 0, spent, seed)
  end
end
local allowed, wait, refused = 1, 0, 0
local slots, member, limit, ttl
if with_slot then
  slots, member = KEYS[n + 1], ARGV[3 * n + 3]
  limit, ttl = tonumber(ARGV[3 * n + 4]), tonumber(ARGV[3 * n + 5])
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', num(now))
  if not redis.call('ZSCORE', slots, member) and redis.call('ZCARD', slots) >= limit then
    allowed, refused = 0, n + 1
  end
end

-- buckets.admit: take every cost, or refuse naming the bucket with the longest wait.
for i = 1, n do
  if refused > n then
    break
  end
  local ok
  if amounts[i] > 0 then
    ok = levels[i] >= amounts[i]
  else
    ok = levels[i] > 0
  end
  if not ok then
    allowed = 0
    local needed = (amounts[i] - levels[i]) / rates[i]
    if refused == 0 or needed > wait then
      wait, refused = needed, i
    end
  end
end
if allowed == 1 then
  for i = 1, n do
    if amounts[i] ~= 0 then  -- a bucket that pays nothing (the TPM check) is left as it was
      levels[i] = levels[i] - amounts[i]
      store(i)
    end
  end
  if slots then
    redis.call('ZADD', slots, num(now + ttl), member)
    redis.call('PEXPIRE', slots, math.ceil((ttl + MARGIN) * 1000))
  end
end
return verdict(allowed, refused, wait, spent, seed)
