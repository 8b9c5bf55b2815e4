// gRPC-Web for the console: Protobuf encoding driven by schema.js (the layout roomctl reads from
// its own descriptor set), the gRPC-Web framing, and the status of every answer with its
// google.rpc details. Messages are plain objects keyed by the proto's field names; 64-bit
// integers are BigInt, enums their names, Timestamps Date objects.

import schema from "./schema.js";

const CODES = [
  "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
  "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
];

const TIMESTAMP = "google.protobuf.Timestamp";
const WIDE = new Set(["int64", "uint64", "sint64", "fixed64", "sfixed64"]);

// A call that ended with a status other than OK. `reason` and `metadata` are its ErrorInfo's.
export class GrpcError extends Error {
  constructor(code, message, info) {
    super(message);
    this.code = code;
    this.codeName = CODES[code] ?? `CODE_${code}`;
    this.reason = info?.reason ?? "";
    this.metadata = info?.metadata ?? {};
  }

  // As the console shows it: the status, the message (which starts with the vendor's code,
  // 5116..., where there is one), and the ErrorInfo reason.
  describe() {
    const reason = this.reason ? ` [${this.reason}]` : "";
    return `${this.codeName}: ${this.message}${reason}`;
  }
}

function layout(typeName) {
  const fields = schema.messages[typeName];
  if (!fields) throw new Error(`unknown message ${typeName}`);
  return fields;
}

// ---- encoding ----

class Writer {
  constructor() { this.bytes = []; }
  varint(value) {
    let v = BigInt.asUintN(64, BigInt(value));
    while (v >= 0x80n) { this.bytes.push(Number(v & 0x7fn) | 0x80); v >>= 7n; }
    this.bytes.push(Number(v));
  }
  tag(number, wire) { this.varint((number << 3) | wire); }
  chunk(bytes) { this.varint(bytes.length); for (const b of bytes) this.bytes.push(b); }
  finish() { return Uint8Array.from(this.bytes); }
}

// The range of each integer kind, so a value out of it is refused here instead of being cut
// to its low bits by the node's decoder.
const RANGE = {
  int32: [-(2n ** 31n), 2n ** 31n - 1n],
  sint32: [-(2n ** 31n), 2n ** 31n - 1n],
  uint32: [0n, 2n ** 32n - 1n],
  int64: [-(2n ** 63n), 2n ** 63n - 1n],
  sint64: [-(2n ** 63n), 2n ** 63n - 1n],
  uint64: [0n, 2n ** 64n - 1n],
};

function scalarVarint(field, value) {
  const { kind, type: enumType } = field;
  if (!["bool", "enum"].includes(kind)) {
    const whole = typeof value === "bigint" || Number.isInteger(value);
    if (!whole) throw new Error(`${field.name}: ${value} is not a whole number`);
    const [low, high] = RANGE[kind];
    if (BigInt(value) < low || BigInt(value) > high) {
      throw new Error(`${field.name}: ${value} is out of the range of a ${kind}`);
    }
  }
  switch (kind) {
    case "bool": return value ? 1 : 0;
    case "enum": {
      if (typeof value === "number") return value;
      const entry = Object.entries(schema.enums[enumType]).find(([, name]) => name === value);
      if (!entry) throw new Error(`${value} is not a ${enumType}`);
      return Number(entry[0]);
    }
    case "sint32": case "sint64": {
      const v = BigInt(value);
      return v < 0n ? -2n * v - 1n : 2n * v;
    }
    default: return value;
  }
}

// Whether a plain (not optional, not oneof) scalar holds its default, which proto3 leaves out.
function isPlainDefault(field, value) {
  if (field.oneof || field.optional || field.kind === "message") return false;
  return value === "" || value === 0 || value === 0n || value === false ||
    (field.kind === "enum" && value === schema.enums[field.type]["0"]);
}

function encodeValue(w, field, value) {
  switch (field.kind) {
    case "string": w.tag(field.number, 2); w.chunk(new TextEncoder().encode(value)); break;
    case "bytes": w.tag(field.number, 2); w.chunk(value); break;
    case "message": w.tag(field.number, 2); w.chunk(encode(field.type, value)); break;
    case "double": case "float": case "fixed32": case "fixed64": case "sfixed32": case "sfixed64":
      throw new Error(`the console does not send ${field.kind} fields`);
    default: w.tag(field.number, 0); w.varint(scalarVarint(field, value));
  }
}

// A message of `typeName` as Protobuf bytes. Unset (undefined) fields are left out; the
// proto3 defaults (0, "", false) are left out too, except for `optional` fields.
export function encode(typeName, message) {
  if (typeName === TIMESTAMP && message instanceof Date) {
    const ms = message.getTime();
    message = { seconds: BigInt(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1e6 };
  }
  const w = new Writer();
  for (const field of layout(typeName)) {
    const value = message[field.name];
    if (value === undefined || value === null) continue;
    if (field.map) {
      const entry = { ...field, kind: "message" };
      for (const [k, v] of Object.entries(value)) encodeValue(w, entry, { key: k, value: v });
    } else if (field.repeated) {
      for (const item of value) encodeValue(w, field, item);
    } else if (!isPlainDefault(field, value)) {
      encodeValue(w, field, value);
    }
  }
  return w.finish();
}

// ---- decoding ----

class Reader {
  constructor(bytes) { this.bytes = bytes; this.at = 0; }
  done() { return this.at >= this.bytes.length; }
  varint() {
    let result = 0n, shift = 0n;
    for (;;) {
      if (this.at >= this.bytes.length) throw new Error("truncated varint");
      const b = this.bytes[this.at++];
      result |= BigInt(b & 0x7f) << shift;
      if (b < 0x80) return result;
      shift += 7n;
    }
  }
  take(n) {
    if (this.at + n > this.bytes.length) throw new Error("truncated field");
    const out = this.bytes.subarray(this.at, this.at + n);
    this.at += n;
    return out;
  }
  chunk() { return this.take(Number(this.varint())); }
  skip(wire) {
    switch (wire) {
      case 0: this.varint(); break;
      case 1: this.take(8); break;
      case 2: this.chunk(); break;
      case 5: this.take(4); break;
      default: throw new Error(`unsupported wire type ${wire}`);
    }
  }
}

function defaultOf(field) {
  // A map has no prototype: a key such as `__proto__` is a key like any other.
  if (field.map) return Object.create(null);
  if (field.repeated) return [];
  if (field.oneof || field.kind === "message") return undefined;
  switch (field.kind) {
    case "string": return "";
    case "bytes": return new Uint8Array();
    case "bool": return false;
    case "enum": return schema.enums[field.type]["0"];
    default: return WIDE.has(field.kind) ? 0n : 0;
  }
}

function decodeScalar(r, field, wire) {
  const view = (n) => {
    const b = r.take(n);
    return new DataView(b.buffer, b.byteOffset, n);
  };
  switch (field.kind) {
    case "string": return new TextDecoder().decode(r.chunk());
    case "bytes": return r.chunk().slice();
    case "message": return decode(field.type, r.chunk());
    case "double": return view(8).getFloat64(0, true);
    case "float": return view(4).getFloat32(0, true);
    case "fixed32": return view(4).getUint32(0, true);
    case "sfixed32": return view(4).getInt32(0, true);
    case "fixed64": return view(8).getBigUint64(0, true);
    case "sfixed64": return view(8).getBigInt64(0, true);
    default: {
      if (wire !== 0) throw new Error(`${field.name}: wire type ${wire} for a ${field.kind}`);
      const v = r.varint();
      switch (field.kind) {
        case "bool": return v !== 0n;
        case "enum": {
          const n = Number(BigInt.asIntN(32, v));
          return schema.enums[field.type][String(n)] ?? n;
        }
        case "int32": return Number(BigInt.asIntN(32, v));
        case "uint32": return Number(BigInt.asUintN(32, v));
        case "int64": return BigInt.asIntN(64, v);
        case "uint64": return v;
        case "sint32": case "sint64": {
          const s = (v >> 1n) ^ -(v & 1n);
          return field.kind === "sint32" ? Number(s) : s;
        }
        default: throw new Error(`unsupported kind ${field.kind}`);
      }
    }
  }
}

// Protobuf bytes as a message of `typeName`: every field present, at its default when absent;
// a oneof also names its case (`payload: "room_disconnected"`); Timestamps come as Dates.
export function decode(typeName, bytes) {
  const fields = layout(typeName);
  const message = {};
  for (const field of fields) message[field.name] = defaultOf(field);
  const r = new Reader(bytes);
  while (!r.done()) {
    const tag = Number(r.varint());
    const number = tag >>> 3, wire = tag & 7;
    const field = fields.find((f) => f.number === number);
    if (!field) { r.skip(wire); continue; }
    if (field.repeated && wire === 2 && !["string", "bytes", "message"].includes(field.kind)) {
      const packed = new Reader(r.chunk());
      while (!packed.done()) message[field.name].push(decodeScalar(packed, field, 0));
    } else if (field.map) {
      const entry = decodeScalar(r, { ...field, kind: "message" }, wire);
      message[field.name][entry.key] = entry.value;
    } else if (field.repeated) {
      message[field.name].push(decodeScalar(r, field, wire));
    } else {
      message[field.name] = decodeScalar(r, field, wire);
      if (field.oneof) message[field.oneof] = field.name;
    }
  }
  if (typeName === TIMESTAMP) {
    return new Date(Number(message.seconds) * 1000 + Math.floor(message.nanos / 1e6));
  }
  return message;
}

// ---- gRPC-Web ----

function frame(bytes) {
  const out = new Uint8Array(5 + bytes.length);
  new DataView(out.buffer).setUint32(1, bytes.length);
  out.set(bytes, 5);
  return out;
}

function base64Bytes(text) {
  const padded = text + "=".repeat((4 - (text.length % 4)) % 4);
  return Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
}

function errorInfo(detailsBin) {
  if (!detailsBin) return undefined;
  try {
    const status = decode("google.rpc.Status", base64Bytes(detailsBin));
    const any = status.details.find((d) => d.type_url.endsWith("/google.rpc.ErrorInfo"));
    return any && decode("google.rpc.ErrorInfo", any.value);
  } catch {
    return undefined;
  }
}

// The status carried in headers (a trailers-only answer) or in the trailer frame.
function statusOf(get) {
  const code = get("grpc-status");
  if (code === null || code === undefined) return undefined;
  const message = decodeURIComponent(get("grpc-message") ?? "");
  return { code: Number(code), message, info: errorInfo(get("grpc-status-details-bin")) };
}

function trailerFields(bytes) {
  const fields = new Map();
  for (const line of new TextDecoder().decode(bytes).split("\r\n")) {
    const at = line.indexOf(":");
    if (at > 0) fields.set(line.slice(0, at).trim().toLowerCase(), line.slice(at + 1).trim());
  }
  return fields;
}

// Calls `method` with `request`, tells `onOpen` once the node has taken the call, and hands
// each answer to `onMessage`; resolves when the call ends OK, rejects with a GrpcError otherwise (a network failure is UNAVAILABLE, as a native
// client would say). `signal` cancels it.
export async function invoke(method, request, { token, signal, timeoutMs, onOpen, onMessage }) {
  const m = schema.methods[method];
  if (!m) throw new Error(`unknown method ${method}`);
  // A request the page cannot encode is the page's error, not the network's.
  const body = frame(encode(m.input, request));
  const headers = {
    "content-type": "application/grpc-web+proto",
    "x-grpc-web": "1",
    authorization: `Bearer ${token}`,
  };
  // A deadline, for the node (grpc-timeout) and for the page, which may otherwise wait
  // forever on a connection that died without a word.
  const deadline = timeoutMs ? AbortSignal.timeout(timeoutMs) : null;
  if (timeoutMs) headers["grpc-timeout"] = `${timeoutMs}m`;
  const signals = [signal, deadline].filter(Boolean);
  const ended = (e, what) => {
    if (deadline?.aborted) return new GrpcError(4, `no answer within ${timeoutMs / 1000} s`);
    if (signal?.aborted) return new GrpcError(1, "cancelled");
    return new GrpcError(14, `${what}: ${e.message}`);
  };
  let response;
  try {
    response = await fetch(m.path, {
      method: "POST",
      headers,
      body,
      signal: signals.length ? AbortSignal.any(signals) : undefined,
      cache: "no-store",
    });
  } catch (e) {
    throw ended(e, "cannot reach the node");
  }
  const early = statusOf((name) => response.headers.get(name));
  if (early && early.code !== 0) throw new GrpcError(early.code, early.message, early.info);
  if (!response.ok) throw new GrpcError(2, `HTTP ${response.status} from the node`);
  onOpen?.();
  const reader = response.body.getReader();
  let buffered = new Uint8Array();
  let status = early;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      const joined = new Uint8Array(buffered.length + value.length);
      joined.set(buffered);
      joined.set(value, buffered.length);
      buffered = joined;
      while (buffered.length >= 5) {
        const length = new DataView(buffered.buffer, buffered.byteOffset).getUint32(1);
        if (buffered.length < 5 + length) break;
        const flags = buffered[0];
        const body = buffered.subarray(5, 5 + length);
        buffered = buffered.slice(5 + length);
        if (flags & 0x80) {
          const fields = trailerFields(body);
          status = statusOf((name) => fields.get(name));
        } else {
          let message;
          try {
            message = decode(m.output, body);
          } catch (e) {
            throw new GrpcError(13, `the page could not read an answer: ${e.message}`);
          }
          onMessage(message);
        }
      }
    }
  } catch (e) {
    if (e instanceof GrpcError) throw e;
    throw ended(e, "the connection to the node was lost");
  }
  if (!status) throw new GrpcError(14, "the node closed the call without a status");
  if (status.code !== 0) throw new GrpcError(status.code, status.message, status.info);
}

// How long a unary call may take before the page gives up on it (DEADLINE_EXCEEDED).
const UNARY_TIMEOUT_MS = 15000;

// A unary call: its one answer.
export async function unary(method, request, options) {
  let answer;
  const timeoutMs = options.timeoutMs ?? UNARY_TIMEOUT_MS;
  await invoke(method, request, { ...options, timeoutMs, onMessage: (m) => { answer = m; } });
  if (answer === undefined) throw new GrpcError(13, "the node sent no answer");
  return answer;
}
