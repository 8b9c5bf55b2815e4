//! The Protobuf codec of RoomControl: tonic's prost codec with a smaller initial buffer.
//!
//! tonic allocates its codec buffer eagerly for every call, 8 KiB by default. An idle `Events`
//! subscription would hold that for its whole life, twice the per-subscription memory budget,
//! while roomctl's messages are mostly a few hundred bytes. Buffers still grow, in steps of this
//! size, for the rare large message (a 1000-id drop's ack).

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

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
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
    }
}
