-- Put before every script by ratelimit.RedisStore: the clock, numbers, the expiry margin,
-- integers compared exactly.

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

-- a < b for integers in decimal, exactly (a total may pass 2^53, where doubles round).
local function below(a, b)
  local a_negative, b_negative = a:sub(1, 1) == '-', b:sub(1, 1) == '-'
  if a_negative ~= b_negative then
    return a_negative
  end
  if a_negative then
    a, b = b:sub(2), a:sub(2)
  end
  if #a ~= #b then
    return #a < #b
  end
  return a < b
end
