-- lease.lua: the prelude of every limits script (limits::redis): Redis' clock, and the leases that hold what
-- a reservation took until it is finished or its lease lapses.
--
-- A tenant's reservations in flight are leases: KEYS[3] is a sorted set (member = reservation id, score = when
-- the lease lapses, on Redis' clock), KEYS[4] a hash (id -> "images usd slot", or "cancelled" for a tombstone),
-- KEYS[5] a hash of their sums (fields images, usd, slots) that budgets and the concurrency limit read. A lease
-- is renewed while its request runs (a long stream) and dropped when the request finishes; a replica that dies
-- holding leases, or a reply lost to a client-side timeout, costs the tenant those holds for one lease at most.
--
-- Every script receives the same nine KEYS: 1 requests bucket (TAT ms), 2 images bucket (TAT ms), 3 leases,
-- 4 lease data, 5 held sums, 6 images today, 7 images this month, 8 USD today, 9 USD this month.

-- Redis < 5 replicates scripts verbatim and refuses writes after TIME unless effects are replicated.
if redis.replicate_commands then
  redis.replicate_commands()
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local LEASES, DATA, HELD = KEYS[3], KEYS[4], KEYS[5]

local function num(s)
  return tonumber(s or '') or 0
end

local function float(x)
  return string.format('%.17g', x)
end

local function int(x)
  return string.format('%d', x)
end

-- What a lease holds: images, USD, slot (0 or 1); zeros for a missing lease or a tombstone.
local function parse(data)
  if not data or data == 'cancelled' then
    return 0, 0, 0
  end
  local images, usd, slot = string.match(data, '^(%S+) (%S+) (%S+)$')
  return num(images), num(usd), num(slot)
end

-- Drop a lease and what it holds from the sums.
local function undo(id)
  local images, usd, slot = parse(redis.call('HGET', DATA, id))
  if images ~= 0 then
    redis.call('HINCRBY', HELD, 'images', int(-images))
  end
  if usd ~= 0 then
    redis.call('HINCRBYFLOAT', HELD, 'usd', float(-usd))
  end
  if slot ~= 0 then
    redis.call('HINCRBY', HELD, 'slots', int(-slot))
  end
  redis.call('HDEL', DATA, id)
  redis.call('ZREM', LEASES, id)
  -- Nothing in flight: start the sums from exact zeros again (no float drift survives).
  if redis.call('ZCARD', LEASES) == 0 then
    redis.call('DEL', HELD, DATA)
  end
end

-- Forget lapsed leases (their holder died or lost its reply).
local function expire_leases()
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', LEASES, '-inf', now)) do
    undo(id)
  end
end

-- The three lease keys live as long as their longest lease.
local function keep(lease)
  for _, key in ipairs({ LEASES, DATA, HELD }) do
    redis.call('PEXPIRE', key, int(lease + 60000))
  end
end

-- The sums held by every lease in flight: images, USD, slots (never negative).
local function held()
  local h = redis.call('HMGET', HELD, 'images', 'usd', 'slots')
  return math.max(num(h[1]), 0), math.max(num(h[2]), 0), math.max(num(h[3]), 0)
end

