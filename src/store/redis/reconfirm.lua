-- reconfirm.lua: the first half of confirming on demand what a room's commits left hidden (with
-- --redis-wait-replicas, a commit its replicas did not confirm in time, and no later commit of
-- the room confirmed since). When the room's seq is past its confirmed one, writes the seq again
-- and returns it: a write of the caller's own, which its `WAIT` then covers, and replication is
-- ordered, so replicas holding this write hold the hidden commits too, whoever made them.
-- Returns 0 when nothing is hidden, or the room is no longer in the epoch the caller saw (so the
-- seq returned is always that epoch's). Sent by `Committer::reconfirm` (commit.rs), which then
-- waits for the replicas and runs confirm.lua. With ARGV[2] '1' it writes whether or not
-- anything is hidden, once every answer key named after it is held here (`Committer::vouch`: a
-- remembered refusal leaves the seq as it was, so the seq cannot say whether its commit
-- reached the replicas, and this master must be one that holds it, not a successor reached
-- after a failover).
--
-- Writes nothing on a cluster master out of touch with most masters, or during an election
-- (quorum.lua).
--
-- KEYS (1, or 2 when vouching): meta, answers. ARGV: 1 the epoch, 2 '1' to vouch, 3 the
-- cluster's node timeout (ms; 0: not a cluster), 4 the newest cluster epoch the caller knows
-- to be settled, then the answer keys that must be held.
local current = redis.call('HMGET', KEYS[1], 'seq', 'confirmed', 'epoch')
if not current[1] or current[3] ~= ARGV[1] then return 0 end
local hidden = current[2] and tonumber(current[2]) < tonumber(current[1])
if ARGV[2] == '1' then
  for k = 5, #ARGV do
    if redis.call('HEXISTS', KEYS[2], ARGV[k]) == 0 then return 0 end
  end
elseif not hidden then
  return 0
end
if in_touch(tonumber(ARGV[3]), tonumber(ARGV[4])) ~= 0 then return 0 end
redis.call('HSET', KEYS[1], 'seq', current[1])
return tonumber(current[1])
