//! Fault injection: deciding, deterministically, whether a request is
//! dropped, answered by a proxy, failed, rate limited or mangled, and the
//! provider-neutral renderings of those faults.

use rand::rngs::StdRng;
use rand::{Rng as _, RngCore as _, SeedableRng as _};
use sha2::{Digest as _, Sha256};

use super::scenario::Faults;
use crate::providers::Provider;

/// A deterministic random source for one request (or one generated data
/// set): seeded from the run's seed, the provider, the user and a number, so
/// a run gives the same answers whatever order users arrive in.
pub struct Dice(StdRng);

impl Dice {
    pub fn new(seed: u64, purpose: &str, provider: Provider, user_id: &str, number: u64) -> Self {
        let digest = Sha256::new()
            .chain_update(seed.to_le_bytes())
            .chain_update(purpose.as_bytes())
            .chain_update([0])
            .chain_update(provider.as_str().as_bytes())
            .chain_update([0])
            .chain_update(user_id.as_bytes())
            .chain_update([0])
            .chain_update(number.to_le_bytes())
            .finalize();
        Self(StdRng::from_seed(digest.into()))
    }

    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.0
    }

    /// A 32-hex-digit id, like the providers' request ids.
    pub fn hex_id(&mut self, bytes: usize) -> String {
        let mut buf = vec![0u8; bytes];
        self.0.fill_bytes(&mut buf);
        hex::encode(buf)
    }
}

/// The fault chosen for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Close the connection without a complete response.
    Drop,
    /// 502 with an nginx-style HTML page.
    ProxyHtml,
    /// A 5xx with the provider's error body.
    ServerError { status: u16 },
    /// A 429 with the provider's error body.
    RateLimit { retry_after_secs: Option<u64> },
    /// 200 with an HTML body.
    NonJson,
    /// 200, `application/json`, the real answer cut in half.
    TruncatedJson,
}

/// Picks the fault for request number `n` (1-based, per user and provider).
/// Every ratio draws from `dice` whether or not it is set, in a fixed order,
/// so enabling one fault does not reshuffle another's decisions.
pub fn decide(faults: &Faults, n: u32, dice: &mut Dice) -> Option<Fault> {
    let rng = dice.rng();
    let mut hit = |first: u32, ratio: f64| {
        let roll: f64 = rng.random();
        n <= first || roll < ratio
    };
    let drop = hit(faults.drop_first, faults.drop_ratio);
    let proxy = hit(faults.proxy_html_first, 0.0);
    let server = hit(faults.server_error_first, faults.server_error_ratio);
    let limited = hit(faults.rate_limit_first, faults.rate_limit_ratio);
    let non_json = hit(faults.non_json_first, faults.non_json_ratio);
    let truncated = hit(faults.truncated_json_first, faults.truncated_json_ratio);
    if drop {
        Some(Fault::Drop)
    } else if proxy {
        Some(Fault::ProxyHtml)
    } else if server {
        Some(Fault::ServerError {
            status: faults.server_error_status,
        })
    } else if limited {
        Some(Fault::RateLimit {
            retry_after_secs: faults.retry_after_secs,
        })
    } else if non_json {
        Some(Fault::NonJson)
    } else if truncated {
        Some(Fault::TruncatedJson)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_n_faults_follow_the_documented_precedence() {
        let faults = Faults {
            drop_first: 1,
            proxy_html_first: 2,
            server_error_first: 3,
            rate_limit_first: 4,
            non_json_first: 5,
            truncated_json_first: 6,
            retry_after_secs: Some(7),
            ..Faults::default()
        };
        let got: Vec<_> = (1..=7)
            .map(|n| {
                decide(
                    &faults,
                    n,
                    &mut Dice::new(1, "f", Provider::Finbox, "u", n.into()),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                Some(Fault::Drop),
                Some(Fault::ProxyHtml),
                Some(Fault::ServerError { status: 503 }),
                Some(Fault::RateLimit {
                    retry_after_secs: Some(7)
                }),
                Some(Fault::NonJson),
                Some(Fault::TruncatedJson),
                None,
            ]
        );
    }

    #[test]
    fn ratios_are_deterministic_per_seed_and_roughly_proportional() {
        let faults = Faults {
            server_error_ratio: 0.3,
            ..Faults::default()
        };
        let run = |seed| {
            (1..=2000u32)
                .map(|n| {
                    decide(
                        &faults,
                        n,
                        &mut Dice::new(seed, "f", Provider::Credeau, "u", n.into()),
                    )
                    .is_some()
                })
                .collect::<Vec<_>>()
        };
        let a = run(42);
        assert_eq!(a, run(42));
        assert_ne!(a, run(43));
        let hits = a.iter().filter(|h| **h).count();
        assert!((480..=720).contains(&hits), "{hits} of 2000");
    }
}
