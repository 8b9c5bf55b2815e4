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

let token = sessionStorage.getItem(TOKEN_KEY) ?? "";
let room = null;
let roomsPage = "";

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
  return date ? date.toISOString().replace("T", " ").slice(0, 19) : "";
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
    c ? `${c.sub} · ${c.role} · room ${c.room} (as the token says; the node checks it)` : "token set";
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
  room?.abort.abort();
  room = null;
  $("room-pane").hidden = true;
}

async function openRoom(id) {
  closeRoom();
  const current = {
    id,
    participants: new Map(),
    locked: false,
    seq: 0n,
    epoch: "",
    abort: new AbortController(),
  };
  room = current;
  $("room-id").textContent = id;
  $("events").replaceChildren();
  $("bans").tBodies[0].replaceChildren();
  $("room-pane").hidden = false;
  setStream("opening");
  try {
    await resync(current, "opened");
  } catch (e) {
    setStream("closed", true);
    showError(e);
    return;
  }
  follow(current);
  refreshConnected(current);
  if (claims(token)?.role !== "participant") listBans();
}

// Replaces the room's state by a snapshot, which becomes the cursor.
async function resync(current, why) {
  const snapshot = await call("ListParticipants", { room_id: current.id });
  if (room !== current) return;
  current.participants = new Map(snapshot.participants.map((p) => [p.client_id, p]));
  current.locked = snapshot.locked;
  current.seq = snapshot.seq;
  current.epoch = snapshot.epoch;
  note(`${why}: snapshot at seq ${snapshot.seq} of epoch ${snapshot.epoch}`);
  render();
}

function setStream(state, down = false) {
  const el = $("stream-state");
  el.textContent = state;
  el.classList.toggle("live", state === "live");
  el.classList.toggle("down", down);
}

// Follows the room's log from its cursor until the room is closed: resumes after any break,
// resyncs when the cursor is out of the log's window, stops on a refusal a retry cannot cure.
async function follow(current) {
  const { signal } = current.abort;
  let failures = 0;
  let lost = null;
  while (!signal.aborted) {
    try {
      await invoke("Events", { room_id: current.id, after_seq: current.seq, epoch: current.epoch }, {
        token,
        signal,
        onOpen: () => {
          setStream("live");
          if (lost !== null) {
            note(`resumed after seq ${lost} of epoch ${current.epoch}: nothing missed`);
            lost = null;
          }
          failures = 0;
        },
        onMessage: (event) => apply(current, event),
      });
      // Ended OK (the session ended, or the node let it go): go on from the cursor.
    } catch (e) {
      if (signal.aborted) return;
      if (e.code === OUT_OF_RANGE) {
        const missed = `seq ${current.seq} of epoch ${current.epoch}`;
        try {
          await resync(current, `resynced: the room's log no longer holds ${missed}; events were missed`);
          setStream("resynced");
          show(`resynced from a snapshot: the log no longer held ${missed}`, true);
        } catch (again) {
          showError(again);
          await sleep(RETRY_MS.at(-1), signal);
        }
        continue;
      }
      if (FINAL.has(e.code)) {
        setStream(e.code === NOT_FOUND ? "room gone" : "refused", true);
        note(`stream refused: ${e.describe()}`);
        showError(e);
        return;
      }
      if (lost === null) {
        lost = current.seq;
        note(`stream lost (${e.describe()}); resuming after seq ${current.seq}`);
      }
      setStream("reconnecting", true);
      await sleep(RETRY_MS[Math.min(failures, RETRY_MS.length - 1)], signal);
      failures += 1;
    }
  }
}

const DESCRIBE = {
  user_connected: (e) => {
    const p = e.participant;
    return `${p.name || p.identity} (${p.client_id}) joined as ${shortEnum(p.role, "ROLE_")}`;
  },
  user_disconnected: (e) => `${e.client_id} left: ${shortEnum(e.reason, "DISCONNECT_REASON_")}`,
  room_disconnected: (e) =>
    `${e.client_id} was told: ${shortEnum(e.reason, "DISCONNECT_REASON_")} "${e.message}"`,
  ack_drop_user: (e) => `drop ${e.request_id} by ${e.moderator} acknowledged: ` +
    e.results.map((r) => `${r.client_id} ${shortEnum(r.outcome, "DROP_OUTCOME_")}`).join(", "),
  room_locked: (e) => `locked by ${e.moderator}`,
  room_unlocked: (e) => `unlocked by ${e.moderator}`,
  session_destroyed: (e) => `session ended by ${e.moderator}: "${e.message}"`,
  user_banned: (e) => `${e.identity} banned until ${when(e.until)} by ${e.moderator}`,
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
    case "user_connected": current.participants.set(body.participant.client_id, body.participant); break;
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
  li.textContent = `#${event.seq} ${event.epoch.slice(0, 8)} ${when(event.time)} ${kind}: ${describe(body)}`;
  $("events").append(li);
  li.scrollIntoView({ block: "nearest" });
  render();
}

function note(text) {
  const li = document.createElement("li");
  li.className = "note";
  li.textContent = text;
  $("events").append(li);
}

function render() {
  if (!room) return;
  $("lock-state").textContent = room.locked ? "locked" : "open";
  $("cursor-seq").textContent = String(room.seq);
  $("cursor-epoch").textContent = room.epoch;
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
async function refreshConnected(current) {
  const { signal } = current.abort;
  while (!signal.aborted) {
    await sleep(CONNECTED_REFRESH_MS, signal);
    if (signal.aborted || $("stream-state").textContent !== "live") continue;
    try {
      const snapshot = await call("ListParticipants", { room_id: current.id });
      if (room !== current || snapshot.seq !== current.seq || snapshot.epoch !== current.epoch) continue;
      for (const p of snapshot.participants) current.participants.set(p.client_id, p);
      render();
    } catch {
      // The stream reports the node's troubles; this refresh stays quiet.
    }
  }
}

// ---- actions ----

async function act(label, method, request, summary) {
  try {
    const answer = await call(method, request);
    show(`${label}: ${summary(answer)}`);
  } catch (e) {
    showError(e);
  }
}

function drop(clientId) {
  const ban = Number($("ban-seconds").value) || 0;
  const request = {
    room_id: room.id,
    client_ids: [clientId],
    reason: $("reason").value,
    request_id: requestId(),
    ban_seconds: ban,
  };
  return act("DropUser", "DropUser", request, (a) =>
    `${a.request_id}: ` +
    a.results.map((r) => `${r.client_id} ${shortEnum(r.outcome, "DROP_OUTCOME_")}`).join(", "));
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
  try {
    const answer = await call("ListBans", { room_id: current.id });
    if (room !== current) return;
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
