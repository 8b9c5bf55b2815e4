-- quorum.lua: put before commit.lua and reconfirm.lua (commit.rs), which write on a cluster
-- master and then `WAIT` for its replicas. `WAIT` alone cannot tell a zombie: a master paused
-- (or cut off) past the cluster's node timeout is being replaced by one of its replicas, yet
-- once it runs again it takes writes as a master until the cluster's messages reach it, and a
-- replica that has not heard of the failover either still confirms them; the fault harness
-- lost an acknowledged drop that way (RELIABILITY.md). So this master writes only when both
-- hold:
-- - it heard from a majority of the masters that own slots (itself counted) within the node
--   timeout. A master back from a pause past its failover sees only old answers, and refuses
--   until its first exchanges, which carry the news of its successor, arrive;
-- - no election is under way: the cluster's current epoch is no newer than the newest the
--   caller knows to be settled, or than the configuration epoch of some node. A replica asking
--   for votes raises the current epoch of every node it reaches, this master included (it is
--   asked too), and the winner takes the new epoch as its configuration epoch. Other masters
--   may vote after they heard from this one again (they keep a master failed for a while), so
--   an election that began before it resumed can end after it was in touch: the first check
--   alone let a fault run lose writes in between. The caller starts from the epoch the
--   cluster had when it connected (CLUSTER NODES shows a replica with its master's epoch, so a
--   cluster made by `redis-cli --cluster create` has a current epoch past every one shown),
--   and takes an epoch it has seen for longer than any election lasts as settled (an election
--   that failed leaves the current epoch ahead for good).

-- 0 when this master may write; -1 when it has not heard a pong from a majority of the
-- slot-owning masters (itself counted) within `timeout` ms (`--redis-cluster-node-timeout`);
-- or the current epoch, when it is ahead of every configuration epoch and of `settled`.
-- Always 0 when `timeout` is 0.
local function in_touch(timeout, settled)
  if timeout == 0 then return 0 end
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  local nodes = redis.call('CLUSTER', 'NODES')
  local masters, heard, newest, at = 0, 0, 0, 1
  -- A line each: id address flags master ping-sent pong-recv config-epoch link-state slots...
  -- Plain finds and one anchored match per line: patterns run over every character cost more
  -- than CLUSTER NODES itself.
  while at <= #nodes do
    local stop = string.find(nodes, '\n', at, true) or #nodes + 1
    local flags, pong, epoch = string.match(nodes, '^%S+ %S+ (%S+) %S+ %d+ (%d+) (%d+)', at)
    if epoch then newest = math.max(newest, tonumber(epoch)) end
    -- A line that ends in a slot (a digit, or the `]` of one migrating) is a master owning
    -- slots; others end in their link state.
    local last = string.byte(nodes, stop - 1)
    local owner = last and ((last >= 48 and last <= 57) or last == 93)
    if owner and flags and string.find(flags, 'master', 1, true) then
      masters = masters + 1
      if string.find(flags, 'myself', 1, true) or now - tonumber(pong) < timeout then
        heard = heard + 1
      end
    end
    at = stop + 1
  end
  if heard * 2 <= masters then return -1 end
  local current = tonumber(string.match(redis.call('CLUSTER', 'INFO'), 'cluster_current_epoch:(%d+)'))
  if current > newest and current > settled then return current end
  return 0
end

