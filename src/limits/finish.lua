-- finish.lua: settle one reservation (limits::redis). Runs after lease.lua (the prelude: `now`, the leases,
-- KEYS 1-9), with the same arithmetic as limits::local.
--
-- Drops the reservation's lease (its slot and what it held against the budgets), gives back the bucket cells
-- it did not use (the TAT moves back by their emission interval, never below now), and adds what it did use
-- to the spending counters that exist (a missing one is seeded from the ledger, which has this request too,
-- by the next reservation that needs it).
--
-- ARGV  1 reservation id   2 request cells to give back   3 request interval (ms)
--       4 image cells to give back   5 image interval (ms)   6 images used   7 USD used

local id = ARGV[1]

-- A tombstone stays until it lapses: it stops a reservation still on its way from taking anything.
if redis.call('HGET', DATA, id) ~= 'cancelled' then
  undo(id)
end

local function give_back(key, cells, interval)
  if cells <= 0 then
    return
  end
  local tat = tonumber(redis.call('GET', key) or '')
  if not tat then
    return
  end
  local new_tat = math.max(tat - cells * interval, now)
  if new_tat <= now then
    redis.call('DEL', key)
  else
    redis.call('SET', key, int(new_tat), 'PX', int(new_tat - now + 1000))
  end
end

give_back(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3]))
give_back(KEYS[2], tonumber(ARGV[4]), tonumber(ARGV[5]))

local images, usd = tonumber(ARGV[6]), tonumber(ARGV[7])
for i = 6, 9 do
  local amount = images
  if i > 7 then
    amount = usd
  end
  if amount > 0 and redis.call('EXISTS', KEYS[i]) == 1 then
    if i > 7 then
      redis.call('INCRBYFLOAT', KEYS[i], float(amount))
    else
      redis.call('INCRBY', KEYS[i], int(amount))
    end
  end
end
return 1
