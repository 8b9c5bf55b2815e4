//! The Protobuf codec of RoomControl: tonic's prost codec with a smaller initial buffer, whose
//! decoder calls a body that is not valid protobuf what it is.
//!
//! tonic allocates its codec buffers eagerly for every call, 8 KiB by default. An idle `Events`
//! subscription would hold its encode buffer for its whole life, twice the per-subscription
//! memory budget, while roomctl's events are mostly under 200 bytes: the encode buffer starts at
//! 256 bytes (a third of an idle subscription's memory went to a 1 KiB one) and grows as a
//! message needs it, for the rare large one (a 1000-id drop's ack). Decode buffers live only
//! while a request is read, and start at 1 KiB.
//!
//! tonic-prost answers a body it cannot decode (invalid UTF-8 in a string, a truncated field, a
//! wrong wire type) with `INTERNAL`, as if the server had failed. It is the caller's fault:
//! [`MalformedDecoder`] answers `INVALID_ARGUMENT` / `MALFORMED_REQUEST` instead. Decoding runs
//! after the authentication interceptor, so a bad token still wins.
//!
//! An event a room's log holds is sent to every stream that follows the room: [`EncodedEvent`]
//! carries it encoded, so it is encoded once for all of them and each stream copies its bytes.
//!
//! [`json`] writes a message as proto3 JSON (from the descriptors reflection serves), for the
//! CLI's `--json` output and webhook bodies, so both speak one schema.
//!
//! It knows messages as bytes: no room state, no rule, no store. It depends on the generated types
//! and the errors only.

use std::marker::PhantomData;
use std::sync::OnceLock;

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType};
use prost::{DecodeError, Message};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstEncoder};

use crate::error::Error;
use crate::pb;

/// Initial size of a call's encode buffer, which an `Events` stream holds while idle.
const ENCODE_BYTES: usize = 256;
/// Initial (and growth step) size of a call's decode buffer.
const DECODE_BYTES: usize = 1024;
/// Encoded bytes gathered before a streaming response yields them to the transport.
const YIELD_BYTES: usize = 32 * 1024;

/// A prost codec with small buffers; named by `build.rs` as the codec of every RPC.
#[derive(Debug, Clone, Copy)]
pub struct CompactCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for CompactCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for CompactCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = MalformedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(ENCODE_BYTES, YIELD_BYTES))
    }

    fn decoder(&mut self) -> Self::Decoder {
        MalformedDecoder(PhantomData)
    }
}

/// Decodes `U` with prost; a body that is not a valid `U` is `MALFORMED_REQUEST`.
#[derive(Debug, Clone, Copy)]
pub struct MalformedDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for MalformedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|err| Error::MalformedRequest(err.to_string()).into())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(DECODE_BYTES, YIELD_BYTES)
    }
}

/// An `Event` in its wire form: what the server's `Events` streams yield (build.rs names it in
/// the generated server in place of `Event`). Cloning it shares the bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodedEvent(Bytes);

impl EncodedEvent {
    /// `event`, encoded.
    pub fn new(event: &pb::Event) -> Self {
        Self(event.encode_to_vec().into())
    }

    /// The encoding `bytes` of an event, copied.
    pub fn copy_from(bytes: &[u8]) -> Self {
        Self(Bytes::copy_from_slice(bytes))
    }

    /// Decodes an event from `bytes`, keeping them as its encoding.
    pub fn decode_event(bytes: Bytes) -> Result<(pb::Event, Self), DecodeError> {
        let event = pb::Event::decode(bytes.clone())?;
        Ok((event, Self(bytes)))
    }
}

impl Message for EncodedEvent {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    /// Decoding goes through `Event`, with its checks: the server never decodes one, and
    /// anything else that does gets what decoding an `Event` and encoding it would give.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let mut event = pb::Event::decode(self.0.clone())?;
        event.merge_field(tag, wire_type, buf, ctx)?;
        *self = Self::new(&event);
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// The descriptors of roomcontrol.v1, for proto3 JSON.
pub fn descriptors() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET)
            .expect("the built-in descriptor set decodes")
    })
}

/// `message` as one line of proto3 JSON (camelCase names, 64-bit integers as strings).
pub fn json<M: Message + Default>(message: &M) -> String {
    let name = std::any::type_name::<M>()
        .rsplit("::")
        .next()
        .unwrap_or_default();
    let descriptor = descriptors()
        .get_message_by_name(&format!("roomcontrol.v1.{name}"))
        .expect("every message written is a roomcontrol.v1 message");
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .expect("a message decodes as itself");
    let mut out = serde_json::Serializer::new(Vec::new());
    dynamic
        .serialize_with_options(&mut out, &SerializeOptions::new())
        .expect("JSON of a message");
    String::from_utf8(out.into_inner()).expect("JSON is UTF-8")
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::engine::{self, Caller, Command, DropCmd, JoinCmd, RoomScope, RoomState, TokenRole};
    use crate::pb::Role;

    fn uuid() -> String {
        uuid::Uuid::new_v4().simple().to_string()
    }

    /// The events of an ordinary room (ids as the server makes them, a name, a reason, a
    /// request id) fit the initial encode buffer with their frame header, so an `Events` stream
    /// encodes them without growing it.
    #[test]
    fn ordinary_events_fit_the_initial_encode_buffer() {
        let room_id = "team-standup-2026-11-26";
        let mut state = RoomState::new(room_id, uuid());
        let moderator = Caller {
            identity: "moderator@example.com".into(),
            scope: RoomScope::One(room_id.into()),
            role: TokenRole::Moderator,
        };
        let client_id = uuid();
        let join = Command::Join {
            client_id: client_id.clone(),
            cmd: JoinCmd {
                name: "Alice Liddell".into(),
                role: Role::Unspecified,
                identity: String::new(),
                request_id: None,
            },
        };
        let drop = Command::Drop(DropCmd {
            client_ids: vec![client_id],
            reason: "repeatedly talking over the speaker".into(),
            request_id: uuid(),
            ban: None,
        });
        let mut events = Vec::new();
        for cmd in [join, drop] {
            let applied = engine::apply(&mut state, &moderator, cmd, SystemTime::now()).unwrap();
            events.extend(applied.events);
        }
        assert_eq!(events.len(), 4, "{events:?}");
        for event in events {
            let framed = event.encoded_len() + 5;
            assert!(framed <= ENCODE_BYTES, "{framed} bytes: {event:?}");
        }
    }

    /// An encoded event is the event's wire bytes, and decodes as an `Event` would (an `Event`
    /// that does not decode does not make one).
    #[test]
    fn an_encoded_event_is_the_event_on_the_wire() {
        let event = pb::Event {
            seq: 7,
            epoch: uuid(),
            room_id: "r".into(),
            time: Some(SystemTime::now().into()),
            payload: Some(pb::event::Payload::UserConnected(pb::UserConnected {
                participant: Some(pb::Participant {
                    client_id: uuid(),
                    name: "Alice".into(),
                    ..Default::default()
                }),
            })),
        };
        let wire = event.encode_to_vec();
        let encoded = EncodedEvent::new(&event);
        assert_eq!(encoded.encode_to_vec(), wire);
        assert_eq!(EncodedEvent::decode(wire.as_slice()).unwrap(), encoded);
        assert!(EncodedEvent::decode(&wire[..wire.len() - 1]).is_err());
    }
}
