-- reserve.lua: check and reserve every limit of one request at once, atomically, on Redis' clock (limits::redis).
--
-- The same semantics as limits::local: GCRA buckets exactly as in limits/gcra.rs, then concurrency, then
-- the image and USD budgets; everything is checked first and written only if everything passes, so a
-- refused request spends nothing anywhere.
--
-- KEYS  1 requests bucket (TAT ms)     2 images bucket (TAT ms)     3 in-flight slots (sorted set)
--       4 images today                 5 images this month          6 USD today      7 USD this month
-- ARGV  1 requests/min   2 request burst   3 images/min   4 image burst   5 concurrent requests
--       6 images/day     7 images/month    8 USD/day      9 USD/month     ('' = no such limit)
--       10 images demanded (n)
--       11 expiry of the day counters, 12 of the month counters (absolute Unix ms)
--       13 lease of a concurrency slot (ms, longer than any request)
--       14 '1' = treat missing budget counters as 0 (after the caller tried to seed them)
--       15 a unique id for the slot this request takes
--
-- In-flight requests are leases, not a bare counter: member = slot id, score = expiry on Redis' clock. A
-- replica that dies holding slots, or a reply lost to a client-side timeout after the script ran, costs the
-- tenant those slots for one lease at most, however busy the tenant stays. Release pops the oldest lease.
--
-- Returns {status, reason, retry_after_ms, requests_remaining, requests_reset_ms, images_remaining,
--          images_reset_ms, now_ms}
--   status  1 granted, 0 refused, -1 a budget counter is missing: seed it from the ledger and call again
--   reason  0 none, 1 requests/min, 2 images/min, 3 concurrency, 4 images/day, 5 images/month,
--           6 USD/day, 7 USD/month
--   retry_after_ms  -1 none, -2 never (the demand exceeds the bucket's burst)
--   remaining/reset -1 when the tenant has no such bucket

-- Redis < 5 replicates scripts verbatim and refuses writes after TIME unless effects are replicated.
if redis.replicate_commands then
  redis.replicate_commands()
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local n = tonumber(ARGV[10])
local concurrent = ARGV[5]
-- KEYS[4..7] and their limits.
local budgets = {
  { key = KEYS[4], limit = ARGV[6] },
  { key = KEYS[5], limit = ARGV[7] },
  { key = KEYS[6], limit = ARGV[8] },
  { key = KEYS[7], limit = ARGV[9] },
}

-- Budget counters must exist (seeded from the ledger) unless the caller already tried.
if ARGV[14] ~= '1' then
  for _, budget in ipairs(budgets) do
    if budget.limit ~= '' and redis.call('EXISTS', budget.key) == 0 then
      return { -1, 0, -1, -1, -1, -1, -1, now }
    end
  end
end

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

local requests = bucket(KEYS[1], ARGV[1], ARGV[2], 1)
local images = bucket(KEYS[2], ARGV[3], ARGV[4], n)

local function respond(status, reason, retry)
  local out = { status, reason, retry, -1, -1, -1, -1, now }
  -- Granted: the buckets after the reservation; refused: as they stand.
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
  return out
end

local function count(key)
  return tonumber(redis.call('GET', key) or '0') or 0
end

-- Check everything, in the order of limits::local.
if requests and requests.retry then
  return respond(0, 1, requests.retry)
end
if images and images.retry then
  return respond(0, 2, images.retry)
end
if concurrent ~= '' then
  -- Forgetting expired leases is housekeeping, not a reservation.
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= tonumber(concurrent) then
    return respond(0, 3, 1000)
  end
end
for i, budget in ipairs(budgets) do
  if budget.limit ~= '' then
    local spent = count(budget.key)
    -- Images: the demand must fit; USD (cost unknown until the answer): refused once spent.
    local over
    if i <= 2 then
      over = spent + n > tonumber(budget.limit)
    else
      over = spent >= tonumber(budget.limit)
    end
    if over then
      return respond(0, 3 + i, -1)
    end
  end
end

-- Everything fits: reserve it all.
for _, b in ipairs({ requests or false, images or false }) do
  if b and b.units > 0 then
    redis.call('SET', b.key, string.format('%d', b.new_tat), 'PX', string.format('%d', b.new_tat - now + 1000))
  end
end
if concurrent ~= '' then
  local lease = tonumber(ARGV[13])
  redis.call('ZADD', KEYS[3], string.format('%d', now + lease), ARGV[15])
  redis.call('PEXPIRE', KEYS[3], string.format('%d', lease + 1000))
end
if n > 0 then
  for i = 1, 2 do
    if budgets[i].limit ~= '' then
      redis.call('INCRBY', budgets[i].key, n)
      redis.call('PEXPIREAT', budgets[i].key, ARGV[10 + i])
    end
  end
end
return respond(1, 0, -1)
