-- In-flight slots (a key's maxConcurrent), atomically, on the server's clock.
-- Mirrors LocalStore.acquire/refresh/release in gateway/buckets.py.
-- (After prelude.lua: clock, num, MARGIN.)
--
-- KEYS[1]: a sorted set of call ids scored by when their slot expires (seconds). A call
--          keeps its slot by refreshing it; a worker killed mid-call stops refreshing,
--          and its slots are purged here once stale.
-- ARGV: mode ("acquire" | "refresh" | "release"), member, limit, ttl seconds, now ("" =
--       the server's TIME).
-- Returns {1|0 (held / refreshed / released), slots in use}.
local key, mode, member = KEYS[1], ARGV[1], ARGV[2]
local limit, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local now = clock(ARGV[5])

redis.call('ZREMRANGEBYSCORE', key, '-inf', num(now))
local held = redis.call('ZSCORE', key, member)

if mode == 'release' then
  redis.call('ZREM', key, member)
  return {1, redis.call('ZCARD', key)}
end
if mode == 'refresh' and not held then
  return {0, redis.call('ZCARD', key)}
end
if mode == 'acquire' and not held and redis.call('ZCARD', key) >= limit then
  return {0, redis.call('ZCARD', key)}
end
redis.call('ZADD', key, num(now + ttl), member)
redis.call('PEXPIRE', key, math.ceil((ttl + MARGIN) * 1000))
return {1, redis.call('ZCARD', key)}
