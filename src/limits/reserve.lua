-- reserve.lua: check and reserve every limit of one request at once, atomically, on Redis' clock (limits::redis).
-- Runs after lease.lua (the prelude: `now`, the leases, KEYS 1-9).
--
-- The same semantics as limits::local: GCRA buckets exactly as in limits/gcra.rs, then concurrency, then the
-- image and USD budgets (spent + held by requests in flight + this demand must fit); everything is checked
-- first and written only if everything passes, so a refused request spends nothing anywhere.
--
-- ARGV  1 requests/min   2 request burst   3 images/min   4 image burst   5 concurrent requests
--       6 images/day     7 images/month    8 USD/day      9 USD/month     ('' = no such limit)
--       10 request units (1, or 0 when adding to a reservation that holds its request)
--       11 images demanded (n)   12 USD demanded (the cost estimate)
--       13 lease (ms)   14 reservation id (the lease's member; the same id adds to an existing lease)
--       15 '1' = treat missing budget counters as 0 (after the caller tried to seed them)
--       16 'reserve', or 'peek' (report the buckets, write nothing)
--
-- Returns {status, reason, retry_after_ms, requests_remaining, requests_reset_ms, images_remaining,
--          images_reset_ms, now_ms, slot_taken}
--   status  1 granted, 0 refused (or peeked), -1 a budget counter is missing: seed it from the ledger and
--           call again, -3 this reservation was cancelled (its caller gave up waiting)
--   reason  0 none, 1 requests/min, 2 images/min, 3 concurrency, 4 images/day, 5 images/month,
--           6 USD/day, 7 USD/month
--   retry_after_ms  -1 none, -2 never (the demand exceeds the bucket's burst)
--   remaining/reset -1 when the tenant has no such bucket

local request_units = tonumber(ARGV[10])
local n = tonumber(ARGV[11])
local usd = tonumber(ARGV[12])
local lease = tonumber(ARGV[13])
local id = ARGV[14]
local concurrent = ARGV[5]
local take_slot = request_units > 0 and concurrent ~= ''
local EPSILON = 1e-9

-- gcra::check: interval T = period / limit (integer ms, at least 1), capacity = burst * T (burst at
-- least 1); `units` fit when max(TAT, now) + units * T - capacity <= now; more than the burst never fits.
local function bucket(key, limit_arg, burst_arg, units)
  if limit_arg == '' then
    return nil
  end
  local limit = tonumber(limit_arg)
  local burst = math.max(tonumber(burst_arg), 1)
  local interval = math.max(math.floor(60000 / math.max(limit, 1)), 1)
  local capacity = burst * interval
  local tat = math.max(tonumber(redis.call('GET', key) or '0') or 0, now)
  local new_tat = tat + units * interval
  local b = { key = key, units = units, interval = interval, capacity = capacity, tat = tat, new_tat = new_tat }
  if units > burst then
    b.retry = -2
  elseif new_tat - capacity > now then
    b.retry = new_tat - capacity - now
  end
  return b
end

-- Units that could be spent now at a given TAT.
local function left(b, tat)
  return math.max(math.floor((now + b.capacity - tat) / b.interval), 0)
end

local requests = bucket(KEYS[1], ARGV[1], ARGV[2], request_units)
local images = bucket(KEYS[2], ARGV[3], ARGV[4], n)

local function respond(status, reason, retry)
  local out = { status, reason, retry, -1, -1, -1, -1, now, 0 }
  -- Granted: the buckets after the reservation; refused or peeked: as they stand.
  for i, b in ipairs({ requests or false, images or false }) do
    if b then
      local tat = b.tat
      if status == 1 then
        tat = b.new_tat
      end
      out[2 + 2 * i] = left(b, tat)
      out[3 + 2 * i] = tat - now
    end
  end
  if status == 1 and take_slot then
    out[9] = 1
  end
  return out
end

if ARGV[16] == 'peek' then
  return respond(0, 0, -1)
end

expire_leases()
local existing = redis.call('HGET', DATA, id)
if existing == 'cancelled' then
  return respond(-3, 0, -1)
end

-- KEYS[6..9], their limits, and what this demand asks of them.
local budgets = {
  { key = KEYS[6], limit = ARGV[6], amount = n },
  { key = KEYS[7], limit = ARGV[7], amount = n },
  { key = KEYS[8], limit = ARGV[8], amount = usd },
  { key = KEYS[9], limit = ARGV[9], amount = usd },
}

-- Budget counters must exist (seeded from the ledger) unless the caller already tried. A demand with
-- nothing for a budget (a cache hit asks no images and no USD) is not checked against it.
if ARGV[15] ~= '1' then
  for _, budget in ipairs(budgets) do
    if budget.limit ~= '' and budget.amount > 0 and redis.call('EXISTS', budget.key) == 0 then
      return respond(-1, 0, -1)
    end
  end
end

-- Check everything, in the order of limits::local.
if requests and requests.retry then
  return respond(0, 1, requests.retry)
end
if images and images.retry then
  return respond(0, 2, images.retry)
end
local held_images, held_usd, held_slots = held()
if take_slot and held_slots >= tonumber(concurrent) then
  return respond(0, 3, 1000)
end
for i, budget in ipairs(budgets) do
  if budget.limit ~= '' and budget.amount > 0 then
    local spent = num(redis.call('GET', budget.key))
    local in_flight = held_images
    if i > 2 then
      in_flight = held_usd
    end
    if spent + in_flight + budget.amount > tonumber(budget.limit) + EPSILON then
      return respond(0, 3 + i, -1)
    end
  end
end

-- Everything fits: reserve it all.
for _, b in ipairs({ requests or false, images or false }) do
  if b and b.units > 0 then
    redis.call('SET', b.key, int(b.new_tat), 'PX', int(b.new_tat - now + 1000))
  end
end
if take_slot or n > 0 or usd > 0 then
  local had_images, had_usd, had_slot = parse(existing)
  local slot = had_slot
  if take_slot then
    slot = 1
  end
  redis.call('HSET', DATA, id, int(had_images + n) .. ' ' .. float(had_usd + usd) .. ' ' .. int(slot))
  if n > 0 then
    redis.call('HINCRBY', HELD, 'images', int(n))
  end
  if usd > 0 then
    redis.call('HINCRBYFLOAT', HELD, 'usd', float(usd))
  end
  if slot > had_slot then
    redis.call('HINCRBY', HELD, 'slots', 1)
  end
  redis.call('ZADD', LEASES, int(now + lease), id)
  keep(lease)
end
return respond(1, 0, -1)
