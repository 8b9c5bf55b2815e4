//! The Protobuf codec of RoomControl: tonic's prost codec with a smaller initial buffer, whose
//! decoder calls a body that is not valid protobuf what it is.
//!
//! tonic allocates its codec buffer eagerly for every call, 8 KiB by default. An idle `Events`
//! subscription would hold that for its whole life, twice the per-subscription memory budget,
//! while roomctl's messages are mostly a few hundred bytes. Buffers still grow, in steps of this
//! size, for the rare large message (a 1000-id drop's ack).
//!
//! tonic-prost answers a body it cannot decode (invalid UTF-8 in a string, a truncated field, a
//! wrong wire type) with `INTERNAL`, as if the server had failed. It is the caller's fault:
//! [`MalformedDecoder`] answers `INVALID_ARGUMENT` / `MALFORMED_REQUEST` instead. Decoding runs
//! after the authentication interceptor, so a bad token still wins.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstEncoder};

use crate::error::Error;

/// Initial (and growth step) size of a call's encode and decode buffers.
const BUFFER_BYTES: usize = 1024;
/// Encoded bytes gathered before a streaming response yields them to the transport.
const YIELD_BYTES: usize = 32 * 1024;

/// A prost codec with 1 KiB buffers; named by `build.rs` as the codec of every RPC.
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
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
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
        BufferSettings::new(BUFFER_BYTES, YIELD_BYTES)
    }
}
