//! The FinBox request salt: Base64(SHA-256(UPPER(hex(MD5(customer_id))) + server_hash)).
//!
//! The FinBox document refers to a "Salt Generation" section it does not
//! contain; the algorithm is the one in FinBox's public documentation, as
//! written down in `providers.md`. The FinBox client signs every request
//! with it; the simulator checks it; `insights-enricher salt` prints it.

use base64::Engine as _;
use md5::{Digest as _, Md5};
use sha2::Sha256;

/// Computes the salt for one request. Both inputs are secrets or personal
/// identifiers: never log the result.
pub fn finbox_salt(customer_id: &str, server_hash: &str) -> String {
    let md5_hex_upper = hex::encode_upper(Md5::digest(customer_id.as_bytes()));
    let mut sha = Sha256::new();
    sha.update(md5_hex_upper.as_bytes());
    sha.update(server_hash.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors computed independently with Python's hashlib:
    //   m = hashlib.md5(cid.encode()).hexdigest().upper()
    //   base64.b64encode(hashlib.sha256((m + hash).encode()).digest())
    #[test]
    fn matches_independently_computed_vector() {
        assert_eq!(
            finbox_salt("1234ABCD4567", "XYZ"),
            "yWWWSsgT7HQ8xSyZ/YP+O+vRyyAcMCLPSLvnkdQBRmU="
        );
    }

    #[test]
    fn salt_is_44_chars_ending_in_padding() {
        let s = finbox_salt("user-1", "hash");
        assert_eq!(s.len(), 44);
        assert!(s.ends_with('='));
    }
}
