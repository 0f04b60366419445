-- Put before every script by ratelimit.RedisStore: the clock, numbers, the expiry margin.

-- The server's clock (TIME), unless the caller passed one (tests replaying a scenario).
local function clock(passed)
  local now = tonumber(passed)
  if now then
    return now
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Doubles survive the trip to Python (and back into a hash) exactly as "%.17g".
local function num(x)
  return string.format('%.17g', x)
end

local MARGIN = 60  -- buckets.EXPIRY_MARGIN: seconds state outlives its use
