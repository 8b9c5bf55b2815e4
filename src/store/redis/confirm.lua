-- confirm.lua: makes a commit visible once replicas confirmed it (--redis-wait-replicas): raises
-- the room's `confirmed` seq to the commit's and publishes its notice, unless the room has moved
-- to another epoch since. Returns 1 if it did, 0 if not.
--
-- KEYS (1): meta. ARGV: 1 epoch, 2 the commit's newest seq, 3 publish command, 4 channel,
-- 5 notice.
local current = redis.call('HMGET', KEYS[1], 'epoch', 'confirmed')
if current[1] ~= ARGV[1] then return 0 end
if tonumber(current[2] or '0') < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'confirmed', ARGV[2])
end
redis.call(ARGV[3], ARGV[4], ARGV[5])
return 1
