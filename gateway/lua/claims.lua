-- Request-id claims (X-NexusGate-ReqId dedup), atomically, on the server's clock.
-- Mirrors LocalStore.claim/keep_claim/settle/unclaim in gateway/buckets.py.
-- (After prelude.lua: clock, num, MARGIN.)
--
-- KEYS[1]: a hash {uid, started, expires, answer} for one request id of one key. The
--          holding call keeps moving ``expires`` forward; a worker killed mid-call stops,
--          and its claim lapses. Once the call is over its holder settles the claim with
--          the answer to replay (``answer``), kept ``ttl`` more seconds. The key itself
--          expires a margin later (garbage collection).
-- KEYS[2] (claim only, optional): the key's mark, when this store first took a claim of
--          its ids (set then, kept a week from the last claim). A store that lost its
--          data (a Redis restarted empty) lost the claims of calls still in flight with
--          it; their workers take them again within a third of INFLIGHT_TTL.
-- ARGV: mode ("claim" | "keep" | "settle" | "release"), uid, ttl seconds, now ("" = the
--       server's TIME), answer (settle only) or age (claim only, optional: seconds the
--       call has held the id already, for a claim taken again after Redis lost it; its
--       ``started`` stays when the call began), then with KEYS[2] the grace: seconds
--       after the mark during which a claim may have been lost.
-- Returns: claim: {} when claimed, else {holder uid, started, now, answer or ""}: the
--          claimer's own uid when claimed within the grace (the caller is to ask the
--          records whether a call with this id still runs);
--          keep / settle / release: 1 if uid was the (live, unsettled) holder, else 0.
local MARK_KEPT = 7 * 86400  -- seconds a key's mark outlives its last claim
local key, mode, uid, ttl = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = clock(ARGV[4])
local holder = redis.call('HMGET', key, 'uid', 'started', 'expires', 'answer')
local live = holder[1] and tonumber(holder[3]) > now
local settled = holder[4] and true or false

if mode == 'claim' then
  if live then
    return {holder[1], holder[2], num(now), holder[4] or ''}
  end
  local age = tonumber(ARGV[5]) or 0
  if age < 0 then
    age = 0
  end
  redis.call('DEL', key)
  redis.call('HSET', key, 'uid', uid, 'started', num(now - age), 'expires', num(now + ttl))
  redis.call('PEXPIRE', key, math.ceil((ttl + MARGIN) * 1000))
  if KEYS[2] then
    local since = tonumber(redis.call('GET', KEYS[2]))
    if since == nil then
      since = now
      redis.call('SET', KEYS[2], num(now))
    end
    redis.call('PEXPIRE', KEYS[2], MARK_KEPT * 1000)
    if now - since < tonumber(ARGV[6]) then
      return {uid, num(now - age), num(now), ''}
    end
  end
  return {}
end
if mode == 'keep' or mode == 'settle' then
  if not live or holder[1] ~= uid or settled then
    return 0
  end
  redis.call('HSET', key, 'expires', num(now + ttl))
  if mode == 'settle' then
    redis.call('HSET', key, 'answer', ARGV[5])
  end
  redis.call('PEXPIRE', key, math.ceil((ttl + MARGIN) * 1000))
  return 1
end
-- release: a claim that lapsed is nobody's (a new claim replaces it), given back or not;
-- its key expires with it. Answered as LocalStore answers whether or not it purged it.
if not live or holder[1] ~= uid or settled then
  return 0
end
redis.call('DEL', key)
return 1
