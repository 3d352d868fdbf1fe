//! Serde helpers shared by the snapshot and message codecs (crate-private).
//!
//! * [`VecFlavor`] lets postcard append to a caller's `Vec` without a second buffer.
//! * [`Bytes`] / [`BoundedBytes`] encode byte strings as postcard byte arrays (a varint
//!   length, then the bytes: the same layout as a sequence of `u8`, but copied at once)
//!   and refuse, before copying, any longer than a stated bound.
//! * [`batch`] decodes a sequence of at most [`MAX_BATCH`](crate::protocol::MAX_BATCH)
//!   entries, refusing a longer one from its length prefix, before decoding any entry.

use core::fmt;
use core::marker::PhantomData;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A postcard output flavor that appends to a borrowed vector.
pub(crate) struct VecFlavor<'a>(pub(crate) &'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for VecFlavor<'_> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Appends the postcard encoding of `value` to `out`.
///
/// # Panics
/// Only if `value`'s `Serialize` impl fails, which none of this crate's types do (postcard
/// fails only on sequences of unknown length and on custom errors; appending to a `Vec`
/// cannot run out of space).
pub(crate) fn append<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    postcard::serialize_with_flavor(value, VecFlavor(out))
        .expect("this crate's types always serialize into a Vec");
}

/// Encoded size of `value` in bytes.
pub(crate) fn encoded_size<T: Serialize + ?Sized>(value: &T) -> usize {
    postcard::experimental::serialized_size(value).expect("this crate's types always serialize")
}

/// A byte string, serialized with `serialize_bytes`.
pub(crate) struct Bytes<'a>(pub(crate) &'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// An owned byte string of at most `MAX` bytes.
pub(crate) struct BoundedBytes<const MAX: usize>(pub(crate) Vec<u8>);

struct BoundedBytesVisitor<const MAX: usize>;

impl<'de, const MAX: usize> Visitor<'de> for BoundedBytesVisitor<MAX> {
    type Value = BoundedBytes<MAX>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a byte string of at most {MAX} bytes")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        if v.len() > MAX {
            return Err(E::invalid_length(v.len(), &self));
        }
        Ok(BoundedBytes(v.to_vec()))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
        if v.len() > MAX {
            return Err(E::invalid_length(v.len(), &self));
        }
        Ok(BoundedBytes(v))
    }
}

impl<'de, const MAX: usize> Deserialize<'de> for BoundedBytes<MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_byte_buf(BoundedBytesVisitor::<MAX>)
    }
}

/// `#[serde(with = "crate::codec::app_bytes")]`: the opaque app snapshot.
pub(crate) mod app_bytes {
    use super::{BoundedBytes, Bytes};
    use crate::snapshot::MAX_APP_STATE;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        Bytes(v).serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        BoundedBytes::<MAX_APP_STATE>::deserialize(d).map(|b| b.0)
    }
}

/// `#[serde(deserialize_with = "crate::codec::batch")]`: a sequence of at most
/// [`MAX_BATCH`](crate::protocol::MAX_BATCH) entries.
pub(crate) fn batch<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    d.deserialize_seq(BatchVisitor(PhantomData))
}

struct BatchVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for BatchVisitor<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a sequence of at most {} entries",
            crate::protocol::MAX_BATCH
        )
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let max = crate::protocol::MAX_BATCH;
        // postcard hints the declared length, or nothing when the declared length is
        // longer than the remaining input (which then fails on its own).
        let hint = seq.size_hint().unwrap_or(0);
        if hint > max {
            return Err(de::Error::invalid_length(hint, &self));
        }
        let mut out = Vec::with_capacity(hint);
        while let Some(v) = seq.next_element()? {
            if out.len() == max {
                return Err(de::Error::invalid_length(max + 1, &self));
            }
            out.push(v);
        }
        Ok(out)
    }
}
