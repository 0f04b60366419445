-- Running totals (a key's spend in one calendar month, in nano-USD), atomically.
-- Mirrors LocalStore.add/raise_to/total in gateway/buckets.py.
--
-- (After prelude.lua: below.)
-- KEYS[1]: an integer counter.
-- ARGV: mode ("add" | "raise" | "peek"), amount (an integer in decimal; add: added,
--       raise: the total becomes it if it is below, never lower), ttl seconds (add, raise).
-- Returns the total as a string: Lua numbers are doubles, and a total may pass 2^53.
local key, mode = KEYS[1], ARGV[1]
if mode == 'add' then
  redis.call('INCRBY', key, ARGV[2])
elseif mode == 'raise' then
  if below(redis.call('GET', key) or '0', ARGV[2]) then
    redis.call('SET', key, ARGV[2])
  end
end
if mode ~= 'peek' then
  redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[3]) * 1000))
end
return redis.call('GET', key) or '0'
