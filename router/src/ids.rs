//! The router's random ids: a request's public id, and the id each attempt of a choice
//! has on its workers. Both come from the operating system's random source, so that
//! nobody can name (and `Cancel`) a request before or while it runs, and ids are unique
//! across routers.

use tandem_proto::ids::ClusterRequestId;

/// 64 bits from the operating system's random source.
fn random_u64() -> u64 {
    getrandom::u64().expect("the operating system's random source")
}

/// A new public request id: 128 random bits, unrelated to the workers' ids.
pub fn public_request_id() -> String {
    format!("req-{:016x}{:016x}", random_u64(), random_u64())
}

/// `bytes` random bytes as hex (a tool call's id).
pub fn random_hex(bytes: usize) -> String {
    (0..bytes.div_ceil(8)).map(|_| format!("{:016x}", random_u64())).collect::<String>()[..bytes * 2].to_string()
}

/// A new id for one attempt at a choice on the workers.
pub(crate) fn worker_request_id() -> ClusterRequestId {
    ClusterRequestId(random_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_ids_are_128_random_bits() {
        let ids: Vec<String> = (0..256).map(|_| public_request_id()).collect();
        for id in &ids {
            let hex = id.strip_prefix("req-").unwrap();
            assert!(hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        }
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        // Half the bits differ between consecutive ids, on average: nothing counts up.
        let low = |id: &String| u64::from_str_radix(&id[id.len() - 16..], 16).unwrap();
        let flips: u32 = ids.windows(2).map(|w| (low(&w[0]) ^ low(&w[1])).count_ones()).sum();
        let mean = flips as f64 / (ids.len() - 1) as f64;
        assert!((24.0..40.0).contains(&mean), "{mean} bits differ on average");
    }
}
