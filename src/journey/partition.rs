//! Which partition the service's producer wrote a user's records to: the
//! producer sets no partition and keys every output and delay-tier record
//! by user id, so librdkafka's partitioner (`consistent_random` unless
//! `kafka.extra.partitioner` says otherwise) decides, and the same hash
//! here finds the one partition to read.

/// A librdkafka partitioner, for keyed records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partitioner {
    /// `consistent`, `consistent_random` (the default): CRC-32 of the key.
    Crc32,
    /// `murmur2`, `murmur2_random`: the Java client's murmur2.
    Murmur2,
    /// `fnv1a`, `fnv1a_random`: 32-bit FNV-1a.
    Fnv1a,
}

impl Partitioner {
    /// The partitioner named by librdkafka's `partitioner` property (absent:
    /// the default); `None` for one that does not hash the key (`random`).
    pub fn from_property(name: Option<&str>) -> Option<Partitioner> {
        match name.unwrap_or("consistent_random") {
            "consistent" | "consistent_random" => Some(Partitioner::Crc32),
            "murmur2" | "murmur2_random" => Some(Partitioner::Murmur2),
            "fnv1a" | "fnv1a_random" => Some(Partitioner::Fnv1a),
            _ => None,
        }
    }

    /// The partition of a record keyed `key` in a topic of `partitions`.
    pub fn partition(self, key: &[u8], partitions: i32) -> i32 {
        let n = partitions.max(1) as u32;
        let p = match self {
            Partitioner::Crc32 => crc32(key) % n,
            Partitioner::Murmur2 => (murmur2(key) & 0x7fff_ffff) % n,
            Partitioner::Fnv1a => fnv1a(key) % n,
        };
        p as i32
    }
}

/// CRC-32 (IEEE 802.3, reflected), as librdkafka's `rd_crc32`.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// murmur2 as the Java client's `Utils.murmur2` (seed 0x9747b28c).
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// 32-bit FNV-1a, as librdkafka's `rd_fnv1a`.
fn fnv1a(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in data {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_their_published_check_values() {
        // CRC-32 and FNV-1a check values for "123456789".
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(fnv1a(b"123456789"), 0xbb86_b11c);
        // The Java client's murmur2 test vectors (signed there).
        for (key, java) in [
            (&b"21"[..], -973_932_308i32),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ] {
            assert_eq!(murmur2(key) as i32, java, "{key:?}");
        }
    }

    #[test]
    fn the_default_and_named_partitioners_are_known_and_random_is_not() {
        assert_eq!(Partitioner::from_property(None), Some(Partitioner::Crc32));
        assert_eq!(
            Partitioner::from_property(Some("murmur2_random")),
            Some(Partitioner::Murmur2)
        );
        assert_eq!(Partitioner::from_property(Some("random")), None);
        let p = Partitioner::Crc32.partition(b"user-1", 12);
        assert!((0..12).contains(&p));
    }
}
