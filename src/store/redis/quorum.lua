-- quorum.lua: put before commit.lua and reconfirm.lua (commit.rs), which write on a cluster
-- master and then `WAIT` for its replicas. `WAIT` alone cannot tell a zombie: a master paused
-- (or cut off) past the cluster's node timeout has been replaced by one of its replicas, yet
-- once it runs again it takes writes as a master until the cluster's messages reach it, and a
-- replica that has not heard of the failover either still confirms them; the fault harness lost
-- an acknowledged drop that way (RELIABILITY.md). A failover needs a majority of the masters
-- that own slots to have heard nothing from the old master for the node timeout, so a master
-- that had an answer from a majority of them (itself counted) within that time has not been
-- replaced; this master writes only then. A master back from a pause sees every answer as old
-- and refuses until its first exchanges, which carry the news of its successor, arrive.

-- Whether this master heard a pong from a majority of the slot-owning masters (itself
-- counted) within the last `timeout` ms (`--redis-cluster-node-timeout`); always when 0.
local function in_touch(timeout)
  if timeout == 0 then return true end
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  local nodes = redis.call('CLUSTER', 'NODES')
  local masters, heard, at = 0, 0, 1
  -- A line each: id address flags master ping-sent pong-recv config-epoch link-state slots...
  -- Plain finds and one anchored match per master: patterns run over every character cost
  -- more than CLUSTER NODES itself.
  while at <= #nodes do
    local stop = string.find(nodes, '\n', at, true) or #nodes + 1
    -- A line that ends in a slot (a digit, or the `]` of one migrating) is a master owning
    -- slots; others end in their link state.
    local last = string.byte(nodes, stop - 1)
    if (last >= 48 and last <= 57) or last == 93 then
      local flags, pong = string.match(nodes, '^%S+ %S+ (%S+) %S+ %d+ (%d+)', at)
      if flags and string.find(flags, 'master', 1, true) then
        masters = masters + 1
        if string.find(flags, 'myself', 1, true) or now - tonumber(pong) < timeout then
          heard = heard + 1
        end
      end
    end
    at = stop + 1
  end
  return heard * 2 > masters
end

