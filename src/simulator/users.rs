//! Per-user state: for each provider, when the user first called, how many
//! requests it made and a capped log of recent answers. Kept in a sharded
//! map with a few dozen bytes per user so a million users fit in memory.

use dashmap::DashMap;
use serde::Serialize;

use crate::providers::Provider;

/// How many recent answers each user keeps per provider.
pub const LOG_CAP: usize = 64;

/// The wall clock in Unix milliseconds: the clock the service schedules
/// its polls with (due times live in Kafka records, so they are wall-clock
/// times), so the spacing of requests in the simulator's log is measured on
/// the same clock the service meant it on. (A monotonic clock anchored at
/// start drifts from the wall clock while NTP slews it, by a millisecond or
/// more within minutes, which would show on-time polls as early ones.)
#[derive(Debug, Clone, Copy, Default)]
pub struct Clock;

impl Clock {
    pub fn new() -> Self {
        Clock
    }

    pub fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// One user's history with one provider.
#[derive(Debug, Default)]
struct Contact {
    first_contact_ms: u64,
    requests: u32,
    /// Ring of `(ms since first contact) << 16 | status`, oldest at `head`
    /// once full; one word per entry keeps the log compact.
    log: Vec<u64>,
    head: u8,
}

impl Contact {
    fn push(&mut self, now_ms: u64, status: u16) {
        let delta = now_ms
            .saturating_sub(self.first_contact_ms)
            .min(u64::MAX >> 16);
        let entry = (delta << 16) | u64::from(status);
        if self.log.len() < LOG_CAP {
            self.log.push(entry);
        } else {
            self.log[usize::from(self.head)] = entry;
            self.head = ((usize::from(self.head) + 1) % LOG_CAP) as u8;
        }
    }

    fn report(&self) -> ContactReport {
        let head = usize::from(self.head);
        let ordered = self.log[head..].iter().chain(&self.log[..head]);
        ContactReport {
            requests: self.requests,
            first_contact: self.first_contact_ms,
            last_requests: ordered
                .map(|e| LoggedRequest {
                    at_ms: self.first_contact_ms + (e >> 16),
                    status: (e & 0xffff) as u16,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Default)]
struct UserState {
    finbox: Option<Contact>,
    credeau: Option<Contact>,
}

impl UserState {
    fn contact(&mut self, provider: Provider) -> &mut Option<Contact> {
        match provider {
            Provider::Finbox => &mut self.finbox,
            Provider::Credeau => &mut self.credeau,
        }
    }
}

/// Where a request stands in its user's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// 1-based request number for this user and provider.
    pub number: u32,
    pub first_contact_ms: u64,
}

/// One logged answer; status 0 means the connection was dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoggedRequest {
    pub at_ms: u64,
    pub status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContactReport {
    pub requests: u32,
    /// Unix milliseconds.
    pub first_contact: u64,
    /// Oldest first, at most [`LOG_CAP`].
    pub last_requests: Vec<LoggedRequest>,
}

/// `GET /admin/users/{user_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserReport {
    pub user_id: String,
    pub finbox: Option<ContactReport>,
    pub credeau: Option<ContactReport>,
}

/// Every user seen since start (or the last reset).
#[derive(Debug, Default)]
pub struct UserBook {
    users: DashMap<Box<str>, UserState>,
}

impl UserBook {
    /// Counts a request and starts the user's clock on first contact.
    pub fn begin(&self, provider: Provider, user_id: &str, now_ms: u64) -> Ticket {
        let mut state = match self.users.get_mut(user_id) {
            Some(s) => s,
            None => self.users.entry(user_id.into()).or_default(),
        };
        let contact = state.contact(provider).get_or_insert_with(|| Contact {
            first_contact_ms: now_ms,
            ..Contact::default()
        });
        contact.requests = contact.requests.saturating_add(1);
        Ticket {
            number: contact.requests,
            first_contact_ms: contact.first_contact_ms,
        }
    }

    /// Logs the answer a request got.
    pub fn record(&self, provider: Provider, user_id: &str, now_ms: u64, status: u16) {
        if let Some(mut state) = self.users.get_mut(user_id) {
            if let Some(contact) = state.contact(provider) {
                contact.push(now_ms, status);
            }
        }
    }

    pub fn report(&self, user_id: &str) -> Option<UserReport> {
        self.users.get(user_id).map(|s| UserReport {
            user_id: user_id.to_owned(),
            finbox: s.finbox.as_ref().map(Contact::report),
            credeau: s.credeau.as_ref().map(Contact::report),
        })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn clear(&self) {
        self.users.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_count_per_user_and_provider() {
        let book = UserBook::default();
        assert_eq!(book.begin(Provider::Finbox, "a", 100).number, 1);
        assert_eq!(book.begin(Provider::Finbox, "a", 200).number, 2);
        let t = book.begin(Provider::Credeau, "a", 300);
        assert_eq!((t.number, t.first_contact_ms), (1, 300));
        assert_eq!(book.begin(Provider::Finbox, "b", 400).number, 1);
        assert_eq!(book.begin(Provider::Finbox, "a", 500).first_contact_ms, 100);
        assert_eq!(book.len(), 2);
    }

    #[test]
    fn log_keeps_the_last_64_answers_oldest_first() {
        let book = UserBook::default();
        for i in 0..100u64 {
            book.begin(Provider::Credeau, "u", 1000 + i);
            book.record(Provider::Credeau, "u", 1000 + i, 200 + (i % 3) as u16);
        }
        let report = book.report("u").unwrap().credeau.unwrap();
        assert_eq!(report.requests, 100);
        assert_eq!(report.last_requests.len(), LOG_CAP);
        assert_eq!(report.last_requests[0].at_ms, 1036);
        assert_eq!(report.last_requests[63].at_ms, 1099);
        assert_eq!(report.last_requests[63].status, 200);
    }
}
