//! The codec of the serving API: prost's, except that a message that does not decode is
//! refused as INVALID_ARGUMENT (the client sent it) naming the field `body`, where tonic's
//! default says INTERNAL.

use std::marker::PhantomData;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstCodec;

/// The metadata key that names the offending field of an INVALID_ARGUMENT.
pub const FIELD_METADATA: &str = "gpo-field";

/// prost's codec with client-side decode errors.
#[derive(Debug, Clone)]
pub struct ServeCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for ServeCodec<T, U> {
    fn default() -> Self {
        ServeCodec(ProstCodec::default())
    }
}

/// Decodes with prost's decoder and turns its error into INVALID_ARGUMENT.
#[derive(Debug)]
pub struct ServeDecoder<D, U>(D, PhantomData<U>);

impl<T, U> Codec for ServeCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = ServeDecoder<<ProstCodec<T, U> as Codec>::Decoder, U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ServeDecoder(self.0.decoder(), PhantomData)
    }
}

impl<D, U> Decoder for ServeDecoder<D, U>
where
    D: Decoder<Item = U, Error = Status>,
    U: Send + 'static,
{
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| invalid("body", s.message()))
    }
}

/// An INVALID_ARGUMENT naming `field` in its message and in the `gpo-field` metadata.
pub fn invalid(field: &str, message: &str) -> Status {
    let mut s = Status::invalid_argument(format!("{field}: {message}"));
    if let Ok(v) = field.parse() {
        s.metadata_mut().insert(FIELD_METADATA, v);
    }
    s
}
