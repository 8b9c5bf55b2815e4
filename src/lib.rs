//! roomctl: a gRPC control plane for real-time conferencing rooms.
//!
//! It knows who is in each room and with which role, lets moderators and trusted services
//! force-disconnect participants (`DropUser`, the vendor's `dropUser`), and streams every
//! resulting event, in order and resumable, to subscribers (`Events`).
//!
//! The modules, from the wire inwards:
//!
//! - [`pb`]: the generated `roomcontrol.v1` types and stubs, and the descriptor set for reflection.
//! - [`server`]: assembly of the gRPC server: auth, health, reflection, limits, graceful shutdown.
//! - [`service`]: thin tonic handlers: caller, validation, store call, error mapping.
//! - [`subscription`]: `Events` streams: a cursor into a room's log that follows it live.
//! - [`auth`]: HS256 bearer tokens, verified once per call in an interceptor.
//! - [`backoff`]: the one capped, jittered backoff every retry loop waits with.
//! - [`validate`]: the contract's field rules, turning requests into domain values.
//! - [`page_token`]: `ListRooms` page tokens, opaque and tamper-evident.
//! - [`engine`]: the pure rules of a room: who may do what, which events a command logs.
//! - [`ids`]: what a valid id is (rooms, clients, requests, identities); depends on nothing.
//! - [`store`]: the `RoomStore` trait that applies commands atomically and reads logs, with
//!   its in-memory and Redis implementations.
//! - [`error`]: the one error enum and its mapping to gRPC statuses with `google.rpc` details.
//! - [`limits`]: overload protection: every limit of a node, load shedding, deadlines, stream
//!   caps and the moderator rate limit.
//! - [`accept`]: the TCP accept loop: backoff when out of file descriptors, a deadline for
//!   the TLS handshake and the HTTP/2 preface, per-connection info.
//! - [`tls`]: TLS and mTLS on the listener, reloadable on SIGHUP.
//! - [`web`]: gRPC-Web's CORS rules, for pages of other origins.
//! - [`console`]: the moderator console's files (plain ES modules), served on the gRPC port.
//! - [`webhooks`]: room events pushed to HTTP endpoints (Standard Webhooks), a delivery
//!   cursor per endpoint on each room's log.
//! - [`telemetry`]: Prometheus metrics and the one-line-per-RPC access log.
//! - [`cli`]: the `roomctl` command line (`serve`, `token`, `config check`, and the client
//!   commands that call a running server).
//! - [`codec`]: tonic's prost codec with small per-call buffers (idle streams stay cheap).
//! - [`clock`]: the wall clock every time-dependent rule reads, so tests can run on paused time.
//! - [`client`]: a RoomControl client that sends a bearer token, for Rust callers.
//!
//! Each module's own doc says what it may not touch. No two modules depend on each other, and
//! the pure layers (`ids`, `error`, `telemetry`, `engine`, `store`, `page_token`, `validate`)
//! depend only on what `tests/module_graph.rs` allows them.

pub mod accept;
pub mod auth;
pub mod backoff;
pub mod cli;
pub mod client;
pub mod clock;
pub mod codec;
pub mod console;
pub mod engine;
pub mod error;
pub mod ids;
pub mod limits;
pub mod page_token;
pub mod pb;
pub mod server;
pub mod service;
pub mod store;
pub mod subscription;
pub mod telemetry;
pub mod tls;
pub mod validate;
pub mod web;
pub mod webhooks;
