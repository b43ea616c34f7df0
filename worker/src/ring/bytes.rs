//! f64 slices as the ring's wire bytes, and the reduction loop.
//!
//! The wire format is little-endian f64. On little-endian targets a slice's memory already
//! is that format, so the ring sends and receives straight from and into the f64 buffers
//! (a byte view, no per-value encoding); on big-endian targets [`encode`] and [`decode`]
//! convert. Both paths are compiled everywhere, and the tests hold the view equal to the
//! encoding, so the fallback cannot rot unseen.

/// The bytes of `v` as they go on the wire (little-endian targets: `v`'s own memory).
#[cfg(target_endian = "little")]
pub(crate) fn wire_view(v: &[f64]) -> &[u8] {
    // SAFETY: f64 has no padding and u8 no alignment requirement; the view covers exactly
    // the slice's `len * 8` initialized bytes and borrows it immutably.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// `v`'s memory as bytes to receive wire data into (little-endian targets only).
#[cfg(target_endian = "little")]
pub(crate) fn wire_view_mut(v: &mut [f64]) -> &mut [u8] {
    // SAFETY: as in `wire_view`; in addition every bit pattern is a valid f64, so any
    // bytes written through the view leave valid values, and the view borrows `v`
    // exclusively for its lifetime.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// The portable encoding of `src` into `dst` (used on big-endian targets).
#[cfg_attr(target_endian = "little", allow(dead_code))]
pub(crate) fn encode(src: &[f64], dst: &mut Vec<u8>) {
    dst.clear();
    dst.reserve(src.len() * 8);
    for v in src {
        dst.extend_from_slice(&v.to_le_bytes());
    }
}

/// The portable decoding of wire bytes into `dst` (used on big-endian targets).
#[cfg_attr(target_endian = "little", allow(dead_code))]
pub(crate) fn decode(src: &[u8], dst: &mut [f64]) {
    for (d, b) in dst.iter_mut().zip(src.chunks_exact(8)) {
        *d = f64::from_le_bytes(b.try_into().expect("chunks_exact(8) yields 8 bytes"));
    }
}

/// Reads `dst.len()` values from the wire into `dst`.
pub(crate) fn read_values(r: &mut impl std::io::Read, dst: &mut [f64]) -> std::io::Result<()> {
    #[cfg(target_endian = "little")]
    {
        r.read_exact(wire_view_mut(dst))
    }
    #[cfg(target_endian = "big")]
    {
        let mut b = vec![0u8; dst.len() * 8];
        r.read_exact(&mut b)?;
        decode(&b, dst);
        Ok(())
    }
}

/// `dst[i] = local[i] + received[i]`: this rank's own value plus the partial sum that
/// arrived, the same additions in the same order as ever (so the same bits). A plain
/// zip the compiler vectorizes.
pub(crate) fn add_into(dst: &mut [f64], local: &[f64], received: &[f64]) {
    debug_assert!(dst.len() == local.len() && dst.len() == received.len());
    for ((d, &a), &b) in dst.iter_mut().zip(local).zip(received) {
        *d = a + b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_view_is_the_portable_encoding() {
        let v: Vec<f64> = vec![0.0, -0.0, 1.5, -3.25e-300, f64::MAX, f64::NAN, 1e308, 7.0];
        let mut enc = Vec::new();
        encode(&v, &mut enc);
        #[cfg(target_endian = "little")]
        assert_eq!(wire_view(&v), &enc[..]);
        let mut back = vec![0.0f64; v.len()];
        decode(&enc, &mut back);
        for (a, b) in v.iter().zip(&back) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
        #[cfg(target_endian = "little")]
        {
            let mut viewed = vec![0.0f64; v.len()];
            wire_view_mut(&mut viewed).copy_from_slice(&enc);
            for (a, b) in v.iter().zip(&viewed) {
                assert_eq!(a.to_bits(), b.to_bits());
            }
        }
    }

    #[test]
    fn add_into_is_local_plus_received() {
        let local = [1.0, 2.0, 0.1];
        let recv = [0.5, -2.0, 0.2];
        let mut d = [9.0; 3];
        add_into(&mut d, &local, &recv);
        for i in 0..3 {
            assert_eq!(d[i].to_bits(), (local[i] + recv[i]).to_bits());
        }
    }
}
