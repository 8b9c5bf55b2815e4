-- commit.lua: the commit of a room's batch, atomic on the room's master (every key shares the
-- room's hash tag). Packed and read by `commit.rs` (`Commit::invoke`, `Committed::of`) alone.
--
-- Changes nothing and returns 0 unless the room is still at the seq and epoch the batch ran on,
-- every member id the batch assumed absent is absent, no answer is in force under a key it
-- assumed absent (among them every key it remembers an answer under), every identity it assumed
-- unbanned has no ban in force, and every client it times out still has a lapsed lease. Then it
-- appends the events (trimming the log to the history's count and bytes, keeping in meta its
-- `oldest` seq and what it weighs as `log_bytes`), applies membership changes (with presence on,
-- a joined client gets a lease in its grace period, a departed one loses its lease), the lock,
-- the bans (purging ended ones), remembers the new answers (forgetting expired ones and, past
-- the byte budget, the oldest; their weight kept in meta as `answers_bytes`), sets or clears the
-- empty-room expiry (with webhooks, not before every endpoint has the room's events),
-- publishes (unless told not to: with replicas to wait for, confirm.lua
-- publishes once they hold the commit), and returns 1, or, when the room is left empty, the time
-- (ms) its keys expire. A commit without events (refusals the room remembers under their
-- request ids) only remembers its answers, under the room's expiry, and returns 1.
--
-- Each commit records the Redis process that made it (`run`, its replication id `replid`, on a
-- cluster its node id `node`); a commit made by another process that may lack the log's tail
-- starts a new epoch and returns -1. With replicas to wait for, a master with fewer online
-- replicas than that changes nothing and returns -2 minus how many it has; a cluster master
-- out of touch with most masters (quorum.lua) changes nothing and returns -1000000, and one
-- that sees an election under way returns -1000000000000 minus the cluster's current epoch.
--
-- An empty room's keys expire together once it has been empty for the TTL and no ban has been in
-- force for as long. A room created anew first deletes whatever a forgotten one of the same id
-- left behind: answers, like the log, belong to their epoch.
--
-- On one Redis (not a cluster, where they live in other slots) the commit also keeps the fleet's
-- room list: it lists a room it creates and schedules the look at a room it leaves empty, in the
-- same atomic step, saving the writer a request before and after; and, with webhooks, makes the
-- room due for each endpoint (unless already due, retrying or in a node's turn).
--
-- A log begun by this commit (a new room, or a new epoch) is copied and the copy put in its
-- place: Redis 7 gives a stream's first block room for `stream-node-max-bytes` (4 KiB by
-- default) at once, and a copy holds only what is used, so a quiet room's log takes hundreds of
-- bytes instead of about 4.7 KiB. Later events grow the block as they come; the copy is made
-- once, while the log is a batch's events.
--
-- KEYS (13, or 15 and more on one Redis): meta, members, departed, owners, log, answers,
-- answered, leases, bans, banned, hooks (webhook cursors), refused, the log's copy (a scratch
-- key of the room's slot, never left behind); then the room list, the schedule of rooms left
-- empty, and each webhook endpoint's due rooms.
-- ARGV: 1 expected seq ('' : the room must not exist), 2 epoch, 3 history (events), 4 empty-room
-- TTL (ms), 5 channel, 6 notice, 7 now (ms), 8 answers' budget (bytes), 9 presence timeout (ms,
-- 0: off), 10 lock ('' unchanged, '1', '0'), 11 publish command (PUBLISH, SPUBLISH, or '': do not
-- publish), 12 the epoch to start if one must be, 13 replicas to wait for (0: none), 14 history
-- (bytes), 15 the room's id (for the room list; '' without it), 16 '1' with webhooks (an
-- emptied room then gets no expiry here), 17 what each answer weighs beyond its key and value
-- (bytes), 18 the cluster's node timeout (ms; 0: not a cluster, or no replicas to wait for),
-- 19 the newest cluster epoch the caller knows to be settled; then counted lists, each a
-- count followed by its items: assumed-absent member ids;
-- assumed-absent answer keys; clients timed out; assumed-unbanned identities; events (seq,
-- bytes); joins (id, member); departures (id, identity, end seq); answers (key, bytes, expiry
-- ms, '1' for a refusal); bans set and lifted, in order (identity, end ms, bytes; end 0 lifts the ban).
local meta, members, departed, owners, log, answers, answered, leases, bans, banned, hooks,
  refused = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9],
  KEYS[10], KEYS[11], KEYS[12]
local expected, epoch, history, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now, answer_budget, presence = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local lock, publish, fresh, needed = ARGV[10], ARGV[11], ARGV[12], tonumber(ARGV[13])
local waiting = needed > 0
local history_bytes = tonumber(ARGV[14])
local log_copy = KEYS[13]
local rooms, expiring, room_id = KEYS[14], KEYS[15], ARGV[15]
local webhooks = ARGV[16] == '1'
local answer_overhead = tonumber(ARGV[17])
local info = redis.call('INFO', 'server', 'replication', 'cluster')
-- A plain find, not a pattern: matching patterns over INFO's text cost more than the rest of
-- the commit. Run and replication ids are 40 hex characters.
local function field(name)
  local _, at = string.find(info, name, 1, true)
  return at and string.sub(info, at + 1, at + 40)
end
if waiting then
  -- A master with fewer online replicas than the commit must wait for could never confirm
  -- it: refuse it before anything changes, so its callers get a definite answer (as Redis's
  -- own min-replicas-to-write refuses writes).
  local online, at = 0, 1
  repeat
    local found = string.find(info, 'state=online', at, true)
    if found then online, at = online + 1, found + 12 end
  until not found
  if online < needed then return -2 - online end
  local touch = in_touch(tonumber(ARGV[18]), tonumber(ARGV[19]))
  if touch == -1 then return -1000000 end
  if touch > 0 then return -1000000000000 - touch end
end
local run = field('run_id:')
local replid = field('master_replid:')
local clustered = string.find(info, 'cluster_enabled:1', 1, true) ~= nil
local node = run
if clustered then node = redis.call('CLUSTER', 'MYID') end
local current = redis.call('HMGET', meta, 'epoch', 'seq', 'run', 'replid', 'confirmed', 'node',
  'oldest', 'log_bytes')
if current[1] and current[3] ~= run then
  -- Another Redis process made the room's last commit. If this one restarted (from an AOF or
  -- RDB that may lack the log's tail) or was promoted from a replica (which may lack it too),
  -- seqs clients have seen could be reused: the log starts anew under a new epoch, so their
  -- cursors get OUT_OF_RANGE. A cluster master the room's slot migrated to (whole) keeps the
  -- epoch. So does, when every visible event was confirmed by replicas, any master that became
  -- one by promotion (it has a second replication id), even when the room's last commit is
  -- more than one failover back: a master replaced, back as its successor's replica and
  -- promoted again holds what its successor held (the fault harness began a new epoch there
  -- while only the last committer's own successor was recognised). A master started from an
  -- AOF, or from nothing, has no second id. Redis 7 gives a master started from an RDB file
  -- (written while it had replicas) that file's id as its second: on a cluster, where the
  -- node id outlives restarts, the committer itself with its own last id as second id is such
  -- a restart, and its file may lack the confirmed tail. One Redis has no such id
  -- (RELIABILITY.md, Open: use AOF with replicas there).
  local replid2 = field('master_replid2:')
  local promoted = current[4] == replid2
  local restarted = clustered and current[6] == node and promoted
  local migrated = clustered and current[6] ~= node and not promoted
  local replicated = waiting and replid2 ~= string.rep('0', 40) and not restarted
  if not migrated and not replicated then
    -- The log holds nothing now: its oldest is the next seq, so readers see an empty window
    -- where the new epoch starts, not the old numbering's.
    redis.call('DEL', log)
    redis.call('HSET', meta, 'oldest', tonumber(current[2]) + 1, 'log_bytes', 0)
    redis.call('HSET', meta, 'epoch', fresh, 'run', run, 'replid', replid, 'node', node)
    if waiting then redis.call('HSET', meta, 'confirmed', current[2]) end
    return -1
  end
end
if expected == '' then
  if current[1] then return 0 end
elseif current[1] ~= epoch or current[2] ~= expected then
  return 0
end
local i = 19
-- One assumption of the batch: a count, then that many names, none of which `present` finds.
local function assumed_absent(present)
  i = i + 1
  for _ = 1, tonumber(ARGV[i]) do
    i = i + 1
    if present(ARGV[i]) then return false end
  end
  return true
end
local function in_hash(key)
  return function(name) return redis.call('HEXISTS', key, name) == 1 end
end
local function in_force(key)
  return function(name)
    local ends = redis.call('ZSCORE', key, name)
    return ends and tonumber(ends) > now
  end
end
-- An answer counts while in force: an expired one, not yet forgotten, is absent to the writer too.
if not (assumed_absent(in_hash(members)) and assumed_absent(in_force(answered))
    and assumed_absent(in_force(leases)) and assumed_absent(in_force(banned))) then
  return 0
end
local room = {meta, members, departed, owners, log, answers, answered, leases, bans, banned, hooks,
  refused}
if expected == '' then
  redis.call('DEL', unpack(room))
  redis.call('HSET', meta, 'epoch', epoch, 'seq', '0')
  if rooms then redis.call('ZADD', rooms, 0, room_id) end
  current[5], current[7], current[8] = false, false, false
end
if not waiting then
  -- Left by nodes that waited for replicas before: it would hide what this commit shows.
  if current[5] then redis.call('HDEL', meta, 'confirmed') end
elseif not current[5] then
  -- Newly created, or first written since waiting was turned on.
  redis.call('HSET', meta, 'confirmed', expected == '' and '0' or expected)
end
-- Whether the log is empty before this commit: a new room, or a new epoch's first commit (whose
-- log was deleted, its oldest seq set past the newest).
local begun = expected == '' or (current[7] and tonumber(current[7]) > tonumber(current[2]))
i = i + 1
local last = nil
local log_bytes = tonumber(current[8] or '0')
for _ = 1, tonumber(ARGV[i]) do
  redis.call('XADD', log, '0-' .. ARGV[i + 1], 'e', ARGV[i + 2])
  log_bytes = log_bytes + #ARGV[i + 2]
  last = ARGV[i + 1]
  i = i + 2
end
i = i + 1
-- The log holds the last `history` events and at most `history_bytes` of them (their encoding),
-- the newest always: walk the oldest entries, weighing each, until both bounds hold. A room
-- logged before the bounds were kept in meta learns its oldest from the stream's length.
local oldest = tonumber(current[7] or '0')
if last then
  if oldest == 0 then oldest = tonumber(last) - redis.call('XLEN', log) + 1 end
  local length = tonumber(last) - oldest + 1
  local must = length - history
  if must > 0 or log_bytes > history_bytes then
    local from, gone, kept = '-', 0, nil
    repeat
      local entries = redis.call('XRANGE', log, from, '+', 'COUNT', math.max(must - gone, 0) + 1)
      for _, entry in ipairs(entries) do
        if (gone >= must and log_bytes <= history_bytes) or length - gone <= 1 then
          kept = entry[1]
          break
        end
        log_bytes = log_bytes - #entry[2][2]
        gone = gone + 1
        from = '(' .. entry[1]
      end
    until kept or #entries == 0
    if gone > 0 then
      oldest = oldest + gone
      redis.call('XTRIM', log, 'MINID', kept or ('0-' .. oldest))
    end
  end
  if begun then
    redis.call('COPY', log, log_copy, 'REPLACE')
    redis.call('RENAME', log_copy, log)
  end
  redis.call('HSET', meta, 'seq', last, 'run', run, 'replid', replid, 'node', node,
    'oldest', oldest, 'log_bytes', math.max(log_bytes, 0))
else
  -- Remembered refusals only, on a room that exists (the writer sends no other commit without
  -- events): the log and its seq stay as they are.
  redis.call('HSET', meta, 'run', run, 'replid', replid, 'node', node)
end
if lock == '1' then
  redis.call('HSET', meta, 'locked', '1')
elseif lock == '0' then
  redis.call('HDEL', meta, 'locked')
end
for _ = 1, tonumber(ARGV[i]) do
  redis.call('HSET', members, ARGV[i + 1], ARGV[i + 2])
  if presence > 0 then
    -- In its grace period (the .5) until it opens a stream.
    redis.call('ZADD', leases, now + presence + 0.5, ARGV[i + 1])
  end
  i = i + 2
end
i = i + 1
for _ = 1, tonumber(ARGV[i]) do
  redis.call('HDEL', members, ARGV[i + 1])
  redis.call('ZREM', leases, ARGV[i + 1])
  redis.call('ZADD', departed, ARGV[i + 3], ARGV[i + 1])
  redis.call('HSET', owners, ARGV[i + 1], ARGV[i + 2])
  i = i + 3
end
i = i + 1
local added = tonumber(ARGV[i])
if added > 0 then
  -- What the answers weigh (keys and values), kept in meta: expired ones and, past the budget,
  -- the oldest are forgotten, refusals first: a caller refused at will (a banned identity
  -- trying new request ids) must not push out the answers of others.
  local weight = tonumber(redis.call('HGET', meta, 'answers_bytes') or '0')
  local function forget(key)
    local held = redis.call('HSTRLEN', answers, key)
    if held > 0 then weight = weight - #key - held - answer_overhead end
    redis.call('HDEL', answers, key)
  end
  for _ = 1, added do
    forget(ARGV[i + 1])
    redis.call('HSET', answers, ARGV[i + 1], ARGV[i + 2])
    redis.call('ZADD', answered, ARGV[i + 3], ARGV[i + 1])
    if ARGV[i + 4] == '1' then redis.call('ZADD', refused, ARGV[i + 3], ARGV[i + 1]) end
    weight = weight + #ARGV[i + 1] + #ARGV[i + 2] + answer_overhead
    i = i + 4
  end
  for _, key in ipairs(redis.call('ZRANGEBYSCORE', answered, '-inf', now)) do forget(key) end
  redis.call('ZREMRANGEBYSCORE', answered, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', refused, '-inf', now)
  while weight > answer_budget do
    local oldest = redis.call('ZPOPMIN', refused)
    if oldest[1] then
      redis.call('ZREM', answered, oldest[1])
    else
      oldest = redis.call('ZPOPMIN', answered)
    end
    if not oldest[1] then break end
    forget(oldest[1])
  end
  redis.call('HSET', meta, 'answers_bytes', math.max(weight, 0))
end
i = i + 1
local banning, unbanned = tonumber(ARGV[i]), 0
for _ = 1, banning do
  if ARGV[i + 2] == '0' then
    redis.call('HDEL', bans, ARGV[i + 1])
    redis.call('ZREM', banned, ARGV[i + 1])
    unbanned = unbanned + 1
  else
    redis.call('HSET', bans, ARGV[i + 1], ARGV[i + 3])
    redis.call('ZADD', banned, ARGV[i + 2], ARGV[i + 1])
  end
  i = i + 3
end
if banning > 0 then
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', banned, '-inf', now)) do
    redis.call('HDEL', bans, gone)
  end
  redis.call('ZREMRANGEBYSCORE', banned, '-inf', now)
end
if oldest > 1 then
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', departed, '-inf', '(' .. oldest)) do
    redis.call('HDEL', owners, gone)
  end
  redis.call('ZREMRANGEBYSCORE', departed, '-inf', '(' .. oldest)
end
local result = 1
if not last then
  -- Nothing to announce, and the room's expiry (or its lack, while webhooks deliver) stays as
  -- it was: the answers' keys, which this commit may have created, follow it.
  local at = redis.call('PEXPIRETIME', meta)
  if at > 0 then
    for _, key in ipairs({answers, answered, refused}) do redis.call('PEXPIREAT', key, at) end
  end
  return result
end
if redis.call('HLEN', members) == 0 and webhooks then
  -- With webhooks, an empty room stays until every endpoint has its events: the delivery of
  -- the last one sets its keys' expiry (hooks.rs, ADVANCE).
  if redis.call('PTTL', meta) ~= -1 then
    for _, key in ipairs(room) do redis.call('PERSIST', key) end
  end
elseif redis.call('HLEN', members) == 0 then
  local at = redis.call('PEXPIRETIME', meta)
  if at < 0 then at = now + ttl end
  local longest = redis.call('ZRANGE', banned, -1, -1, 'WITHSCORES')
  if longest[2] then at = math.max(at, tonumber(longest[2]) + ttl) end
  if unbanned > 0 then at = math.max(at, now + ttl) end
  at = string.format('%.0f', at)
  for _, key in ipairs(room) do redis.call('PEXPIREAT', key, at) end
  if expiring then redis.call('ZADD', expiring, at, room_id) end
  result = tonumber(at)
elseif redis.call('PTTL', meta) ~= -1 then
  for _, key in ipairs(room) do redis.call('PERSIST', key) end
end
if publish ~= '' then redis.call(publish, ARGV[5], ARGV[6]) end
for k = 16, #KEYS do redis.call('ZADD', KEYS[k], 'NX', 0, room_id) end
return result
