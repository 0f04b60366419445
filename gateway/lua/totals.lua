-- Running totals (a key's spend in one calendar month, in nano-USD), atomically.
-- Mirrors LocalStore.add/total in gateway/buckets.py.
--
-- KEYS[1]: an integer counter.
-- ARGV: mode ("add" | "peek"), amount (an integer, add only), ttl seconds (add only).
-- Returns the total as a string: Lua numbers are doubles, and a total may pass 2^53.
local key, mode = KEYS[1], ARGV[1]
if mode == 'add' then
  redis.call('INCRBY', key, ARGV[2])
  redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[3]) * 1000))
end
return redis.call('GET', key) or '0'
