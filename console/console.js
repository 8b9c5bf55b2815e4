// The console page: a token kept in sessionStorage (never in a URL), the rooms a service token
// can list, and one room kept live from its `Events` stream: participants, lock, bans and the
// event log, resumed from (after_seq, epoch) after a disconnect, resynced from a snapshot when
// the log no longer holds the cursor. Every text shown is set as text, never as markup.

import { unary, invoke, GrpcError } from "./grpcweb.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "roomctl.console.token";
const OUT_OF_RANGE = 11;
const NOT_FOUND = 5;
// Refusals a retry with the same token cannot cure: the stream stops until the user acts.
const FINAL = new Set([3, 5, 7, 16]);
const RETRY_MS = [250, 500, 1000, 2000, 4000];
const CONNECTED_REFRESH_MS = 5000;
// The event log keeps this many lines, the oldest dropped first: a busy room must not grow the
// page without bound.
const MAX_LOG_LINES = 1000;

let token = sessionStorage.getItem(TOKEN_KEY) ?? "";
let room = null;
let roomsPage = "";
let listingRooms = false;
let bansAsked = 0;

// ---- small helpers ----

function claims(jwt) {
  try {
    const part = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
  } catch {
    return null;
  }
}

function show(text, error = false) {
  const out = $("result");
  out.textContent = text;
  out.classList.toggle("error", error);
}

function showError(e) {
  show(e instanceof GrpcError ? e.describe() : String(e), true);
}

function call(method, request) {
  if (!token) return Promise.reject(new Error("paste a token first"));
  return unary(method, request, { token });
}

function requestId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return "console-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function shortEnum(value, prefix) {
  return String(value).replace(prefix, "");
}

function when(date) {
  if (!date) return "";
  return Number.isNaN(date.getTime()) ? "(out of range)" : date.toISOString().replace("T", " ").slice(0, 19);
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function button(text, onClick, className) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  if (className) b.className = className;
  b.addEventListener("click", onClick);
  return b;
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
});

// ---- the token ----

function useToken(given) {
  token = given;
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
  const c = token ? claims(token) : null;
  $("who").textContent = !token ? "no token" :
    c ? `${c.sub} · ${c.role} · room ${c.room} (as the token says; the node checks it)` :
      "not a JWT: the node will refuse it";
  // A new token for the room on show (the old one expired): go on from the page's cursor.
  if (room && c && (c.room === room.id || c.room === "*") && room.epoch !== "") {
    follow(room, { resumeWith: "a new token" });
    return;
  }
  closeRoom();
  $("rooms").tBodies[0].replaceChildren();
  $("more-rooms").hidden = true;
  if (c?.room && c.room !== "*") {
    $("open-room").value = c.room;
    openRoom(c.room);
  } else if (c?.role === "service") {
    listRooms(true);
  }
}

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const given = $("token").value.trim();
  $("token").value = "";
  useToken(given);
});
$("forget-token").addEventListener("click", () => useToken(""));

// ---- rooms ----

async function listRooms(fresh) {
  if (listingRooms) return;
  listingRooms = true;
  if (fresh) {
    roomsPage = "";
    $("rooms").tBodies[0].replaceChildren();
  }
  try {
    const page = await call("ListRooms", { page_size: 50, page_token: roomsPage });
    const body = $("rooms").tBodies[0];
    for (const r of page.rooms) {
      const row = body.insertRow();
      row.dataset.roomId = r.room_id;
      cell(row, "").append(button(r.room_id, () => openRoom(r.room_id), "link"));
      cell(row, String(r.participants));
      cell(row, r.locked ? "locked" : "");
      cell(row, String(r.seq));
    }
    roomsPage = page.next_page_token;
    $("more-rooms").hidden = !roomsPage;
    show(`${body.rows.length} room(s)`);
  } catch (e) {
    showError(e);
  } finally {
    listingRooms = false;
  }
}

$("list-rooms").addEventListener("click", () => listRooms(true));
$("more-rooms").addEventListener("click", () => listRooms(false));
$("open-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const id = $("open-room").value.trim();
  if (id) openRoom(id);
});

// ---- one room ----

function closeRoom() {
  room?.following?.abort();
  room = null;
  $("room-pane").hidden = true;
}

function openRoom(id) {
  closeRoom();
  const current = {
    id,
    participants: new Map(),
    // Names of every client seen, departed ones included, for the log's lines.
    names: new Map(),
    locked: false,
    seq: 0n,
    epoch: "",
    // Ends the room's stream and refresh: on close, or when a new token takes over.
    following: null,
    // Ends the current stream attempt alone, to resume from the cursor.
    attempt: null,
  };
  room = current;
  $("room-id").textContent = id;
  $("events").replaceChildren();
  logFollows = true;
  logTop = 0;
  $("bans").tBodies[0].replaceChildren();
  $("room-pane").hidden = false;
  render();
  setStream("opening");
  follow(current, { snapshot: "opened" });
  if (claims(token)?.role !== "participant") listBans();
}

// Replaces the room's state by a snapshot, which becomes the cursor.
async function resync(current, why) {
  const snapshot = await call("ListParticipants", { room_id: current.id });
  if (room !== current) return;
  current.participants = new Map(snapshot.participants.map((p) => [p.client_id, p]));
  for (const p of snapshot.participants) current.names.set(p.client_id, p.name || p.identity);
  current.locked = snapshot.locked;
  current.seq = snapshot.seq;
  current.epoch = snapshot.epoch;
  note(`${why}: snapshot at seq ${snapshot.seq} of epoch ${snapshot.epoch}`);
  render();
}

// Forgets what the page showed of the room: it is not known (gone, or not this token's).
function forget(current) {
  current.participants.clear();
  current.locked = false;
  current.seq = 0n;
  current.epoch = "";
  render();
}

function setStream(state, down = false) {
  const el = $("stream-state");
  el.textContent = state;
  el.classList.toggle("live", state === "live");
  el.classList.toggle("down", down);
}

// Follows the room until it is closed: a snapshot, then the log from the snapshot's cursor,
// resumed from the cursor after any break; a new snapshot when the log no longer holds the
// cursor (and the user is told); waits for a room that does not exist (yet, or again); stops
// on a refusal a retry cannot cure.
function follow(current, { snapshot = null, resumeWith = null }) {
  current.following?.abort();
  current.following = new AbortController();
  const { signal } = current.following;
  refreshConnected(current, signal);
  return stream(current, signal, snapshot, resumeWith);
}

async function stream(current, signal, firstSnapshot, resumeWith) {
  let failures = 0;
  // The seq the stream broke at, until it is resumed.
  let lost = resumeWith ? current.seq : null;
  // Why a snapshot must be taken before the next stream, or null.
  let snapshot = firstSnapshot;
  // Whether the user was told the room does not exist.
  let missing = false;
  const pause = async (state) => {
    setStream(state, true);
    await sleep(RETRY_MS[Math.min(failures, RETRY_MS.length - 1)], signal);
    failures += 1;
  };
  while (!signal.aborted) {
    if (snapshot) {
      try {
        const why = snapshot;
        await resync(current, why);
        snapshot = null;
        lost = null;
        missing = false;
        show(why === "opened" ? `room ${current.id} opened` : `room ${current.id}: ${why}`, why !== "opened");
      } catch (e) {
        if (signal.aborted) return;
        if (e.code === NOT_FOUND) {
          if (!missing) {
            forget(current);
            note(`${e.describe()}; waiting for it (a room exists from its first join)`);
            showError(e);
            missing = true;
          }
          await pause("waiting for the room");
        } else if (FINAL.has(e.code)) {
          forget(current);
          setStream("refused", true);
          note(`refused: ${e.describe()}`);
          showError(e);
          return;
        } else {
          await pause("reconnecting");
        }
        continue;
      }
    }
    current.attempt = new AbortController();
    const attempt = current.attempt.signal;
    try {
      await invoke("Events", { room_id: current.id, after_seq: current.seq, epoch: current.epoch }, {
        token,
        signal: AbortSignal.any([signal, attempt]),
        onOpen: () => {
          setStream("live");
          if (lost !== null) {
            const how = resumeWith ? ` with ${resumeWith}` : "";
            note(`resumed${how} after seq ${lost} of epoch ${current.epoch}: nothing missed`);
            show(`room ${current.id}: live again, nothing missed`);
            lost = null;
            resumeWith = null;
          }
          failures = 0;
        },
        onMessage: (event) => apply(current, event),
      });
      // Ended OK (the session ended, or the node let it go): go on from the cursor.
    } catch (e) {
      if (signal.aborted) return;
      // Restarted on purpose (a stream fallen silent): resume from the cursor at once.
      if (attempt.aborted) continue;
      if (e.code === OUT_OF_RANGE) {
        snapshot = `resynced: the room's log no longer holds seq ${current.seq} of epoch ${current.epoch}; events were missed`;
      } else if (e.code === NOT_FOUND) {
        snapshot = `resynced: the room was forgotten and began again; events were missed`;
      } else if (FINAL.has(e.code)) {
        setStream("refused", true);
        note(`stream refused: ${e.describe()}; what is shown is a snapshot and will not change`);
        showError(e);
        return;
      } else {
        if (lost === null) {
          lost = current.seq;
          note(`stream lost (${e.describe()}); resuming after seq ${current.seq}`);
        }
        await pause("reconnecting");
      }
    }
  }
}

// A client as the log names it: its name, if the page saw it, and the start of its id.
function who(current, clientId) {
  const name = current.names.get(clientId);
  return name ? `${name} (${clientId.slice(0, 8)})` : clientId;
}

function outcomes(current, results) {
  return results.map((r) => `${who(current, r.client_id)} ${shortEnum(r.outcome, "DROP_OUTCOME_")}`).join(", ");
}

const DESCRIBE = {
  user_connected: (e, c) => `${who(c, e.participant.client_id)} joined as ${shortEnum(e.participant.role, "ROLE_")}`,
  user_disconnected: (e, c) => `${who(c, e.client_id)} left: ${shortEnum(e.reason, "DISCONNECT_REASON_")}`,
  room_disconnected: (e, c) =>
    `${who(c, e.client_id)} was told: ${shortEnum(e.reason, "DISCONNECT_REASON_")} "${e.message}"`,
  ack_drop_user: (e, c) => `drop ${e.request_id} by ${e.moderator} acknowledged: ${outcomes(c, e.results)}`,
  room_locked: (e) => `locked by ${e.moderator}`,
  room_unlocked: (e) => `unlocked by ${e.moderator}`,
  session_destroyed: (e) => `session ended by ${e.moderator}: "${e.message}"`,
  user_banned: (e) => `${e.identity} banned until ${when(e.until)} UTC by ${e.moderator}`,
  user_unbanned: (e) => `${e.identity} unbanned by ${e.moderator}`,
};

function apply(current, event) {
  if (room !== current) return;
  // Seqs may skip what this token may not see (another client's room_disconnected), but never
  // go back or change epoch within a stream: the node guarantees it; say so loudly if not.
  if (event.epoch !== current.epoch || event.seq <= current.seq) {
    note(`out of order: got seq ${event.seq} of ${event.epoch} after ${current.seq} of ${current.epoch}`);
  }
  current.seq = event.seq;
  current.epoch = event.epoch;
  const kind = event.payload;
  const body = event[kind];
  switch (kind) {
    case "user_connected": {
      const p = body.participant;
      current.participants.set(p.client_id, p);
      current.names.set(p.client_id, p.name || p.identity);
      break;
    }
    case "user_disconnected": current.participants.delete(body.client_id); break;
    case "room_locked": current.locked = true; break;
    case "room_unlocked": current.locked = false; break;
    case "session_destroyed": current.participants.clear(); current.locked = false; break;
    case "user_banned": case "user_unbanned":
      if (claims(token)?.role !== "participant") listBans();
      break;
    default: break;
  }
  const li = document.createElement("li");
  li.dataset.seq = String(event.seq);
  li.dataset.kind = kind ?? "unknown";
  const describe = DESCRIBE[kind] ?? (() => "an event this console does not know");
  li.dataset.epoch = event.epoch;
  li.title = `seq ${event.seq} of epoch ${event.epoch}`;
  const time = event.time ? `${event.time.toISOString().slice(11, 19)}Z` : "";
  li.textContent = `#${event.seq} ${event.epoch.slice(0, 8)} ${time} ${kind}: ${describe(body, current)}`;
  log(li);
  render();
}

function note(text) {
  const li = document.createElement("li");
  li.className = "note";
  li.textContent = text;
  log(li);
  render();
}

// Adds a line to the event log, dropping the oldest past MAX_LOG_LINES.
function log(li) {
  const lines = $("events");
  lines.append(li);
  while (lines.childElementCount > MAX_LOG_LINES) lines.firstElementChild.remove();
}

// Whether the log follows its newest line: not while the user scrolls back through it. Lines
// added since the page last scrolled it are no sign of that, only a move up from where the
// page put it is; a move back to the bottom follows again.
let logFollows = true;
let logTop = 0;
$("events").addEventListener("scroll", () => {
  const lines = $("events");
  if (lines.scrollHeight - lines.scrollTop - lines.clientHeight < 40) logFollows = true;
  else if (lines.scrollTop < logTop - 2) logFollows = false;
});

// Redraws at most once a frame, however many events arrive: a burst of joins costs one redraw.
let drawing = false;
function render() {
  if (drawing) return;
  drawing = true;
  requestAnimationFrame(() => {
    drawing = false;
    draw();
  });
}

function draw() {
  if (!room) return;
  if (logFollows) {
    const lines = $("events");
    lines.scrollTop = lines.scrollHeight;
    logTop = lines.scrollTop;
  }
  const known = room.epoch !== "";
  $("lock-state").textContent = !known ? "unknown" : room.locked ? "locked" : "open";
  $("cursor-seq").textContent = known ? String(room.seq) : "-";
  $("cursor-epoch").textContent = known ? room.epoch : "-";
  const body = $("participants").tBodies[0];
  body.replaceChildren();
  for (const p of room.participants.values()) {
    const row = body.insertRow();
    row.dataset.clientId = p.client_id;
    cell(row, p.name);
    cell(row, p.identity);
    cell(row, p.client_id, "mono");
    cell(row, shortEnum(p.role, "ROLE_"));
    cell(row, p.connected ? "yes" : "no", "connected");
    cell(row, when(p.joined_at));
    cell(row, "").append(button("Drop", () => drop(p.client_id), "danger drop"));
  }
}

// `connected` changes with streams, not events: re-read it from snapshots that match the cursor.
// A snapshot ahead of the cursor twice running, with no event in between, means the stream may
// have fallen silent (a connection dead without a word): it is restarted from the cursor, which
// costs nothing if it was only that the newest events are not this token's to see.
async function refreshConnected(current, signal) {
  // The cursor when the room was first seen ahead of it.
  let behindAt = null;
  // A restart made at `cursor` for a room at `target`: if it brings nothing, the events up to
  // `target` are not this token's to see (another moderator's ack), and no restart is due.
  let restarted = null;
  let unseenUpTo = 0n;
  while (!signal.aborted) {
    await sleep(CONNECTED_REFRESH_MS, signal);
    if (signal.aborted || $("stream-state").textContent !== "live") continue;
    try {
      const snapshot = await call("ListParticipants", { room_id: current.id });
      if (room !== current || snapshot.epoch !== current.epoch) continue;
      if (restarted && current.seq === restarted.cursor) unseenUpTo = restarted.target;
      restarted = null;
      if (snapshot.seq > current.seq && snapshot.seq > unseenUpTo) {
        if (behindAt === current.seq) {
          current.attempt?.abort();
          restarted = { cursor: current.seq, target: snapshot.seq };
          behindAt = null;
        } else {
          behindAt = current.seq;
        }
        continue;
      }
      behindAt = null;
      if (snapshot.seq !== current.seq) continue;
      // Redrawn only when a flag changed: a redraw of a big room costs, and eats clicks.
      let changed = false;
      for (const p of snapshot.participants) {
        changed ||= current.participants.get(p.client_id)?.connected !== p.connected;
        current.participants.set(p.client_id, p);
      }
      if (changed) render();
    } catch {
      // The stream reports the node's troubles; this refresh stays quiet.
    }
  }
}

// ---- actions ----

// Calls `method` and shows its answer or error; whether it succeeded.
async function act(label, method, request, summary) {
  try {
    const answer = await call(method, request);
    show(`${label}: ${summary(answer)}`);
    return true;
  } catch (e) {
    showError(e);
    return false;
  }
}

const MAX_BAN_SECONDS = 2592000;

async function drop(clientId) {
  const field = $("ban-seconds");
  const text = field.value.trim();
  const ban = text === "" ? 0 : Number(text);
  // A number field reads "" for what is not a number: that is no "0".
  if (field.validity.badInput || !Number.isInteger(ban) || ban < 0 || ban > MAX_BAN_SECONDS) {
    show(`Ban for: a whole number of seconds, 0 (no ban) to ${MAX_BAN_SECONDS} (30 days)`, true);
    return;
  }
  const name = who(room, clientId);
  if (ban > 0 && !window.confirm(`Drop ${name} and ban them from ${room.id} for ${ban} s?`)) return;
  const request = {
    room_id: room.id,
    client_ids: [clientId],
    reason: $("reason").value,
    request_id: requestId(),
    ban_seconds: ban,
  };
  const current = room;
  const done = await act("DropUser", "DropUser", request, (a) => `${a.request_id}: ${outcomes(current, a.results)}`);
  // A ban is for this drop: the next one bans only if asked again.
  if (done) field.value = "0";
}

$("lock").addEventListener("click", () =>
  act("LockRoom", "LockRoom", { room_id: room.id, request_id: requestId() }, (a) => `locked at seq ${a.seq}`));
$("unlock").addEventListener("click", () =>
  act("UnlockRoom", "UnlockRoom", { room_id: room.id, request_id: requestId() }, (a) => `unlocked at seq ${a.seq}`));
$("end-session").addEventListener("click", () => {
  if (!window.confirm(`End the session of ${room.id}? Everyone in it is removed.`)) return;
  act("DestroySession", "DestroySession",
    { room_id: room.id, reason: $("reason").value, request_id: requestId() },
    (a) => `ended at seq ${a.seq}; removed ${a.client_ids.length} client(s)`);
});

async function listBans() {
  if (!room) return;
  const current = room;
  // Only the newest request's answer is shown: answers may come back out of order.
  const asked = ++bansAsked;
  try {
    const answer = await call("ListBans", { room_id: current.id });
    if (room !== current || asked !== bansAsked) return;
    const body = $("bans").tBodies[0];
    body.replaceChildren();
    for (const ban of answer.bans) {
      const row = body.insertRow();
      row.dataset.identity = ban.identity;
      cell(row, ban.identity);
      cell(row, when(ban.until));
      cell(row, ban.moderator);
      cell(row, "").append(button("Unban", () =>
        act("Unban", "Unban", { room_id: current.id, identity: ban.identity }, (a) => `${ban.identity} unbanned at seq ${a.seq}`),
      "unban"));
    }
  } catch (e) {
    showError(e);
  }
}

$("list-bans").addEventListener("click", listBans);

useToken(token);
