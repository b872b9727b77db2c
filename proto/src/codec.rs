//! The codec every generated service and client uses: prost's, except that a
//! request that does not decode (invalid UTF-8 in a string field, a truncated
//! or malformed message) is the client's fault, so it answers INVALID_ARGUMENT
//! naming the field prost stopped at, where prost's codec answers INTERNAL.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstEncoder;

/// `tonic_prost::ProstCodec` with client-error statuses for undecodable messages.
#[derive(Debug, Clone)]
pub struct TandemCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for TandemCodec<T, U> {
    fn default() -> Self {
        TandemCodec(PhantomData)
    }
}

impl<T, U> Codec for TandemCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = TandemDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        TandemDecoder(PhantomData)
    }
}

/// Decodes `U`; a decode error is INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct TandemDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for TandemDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| Status::invalid_argument(format!("the message does not decode: {e}")))
    }
}
