//! Deterministic extracted-SMS entries shaped like Credeau's: bank debits
//! and credits, card spends, salary, EMI reminders, declined transactions
//! and plain notifications, with the optional fields present or absent the
//! way the document's examples show. The same (seed, user) always yields the
//! same messages, newest first.

use rand::seq::IndexedRandom as _;
use rand::Rng as _;
use serde::Serialize;

use super::faults::Dice;
use super::respond::credeau_timestamp;
use crate::providers::Provider;

/// One `extracted_sms_data` entry. Optional fields are left out, not
/// nulled, as in the document's examples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SmsEntry {
    #[serde(rename = "_id")]
    pub id: String,
    pub user_id: String,
    pub client_id: String,
    pub request_id: String,
    pub sms_id: String,
    pub sms_sender: &'static str,
    pub sms_inbox_date: String,
    pub sms_body: String,
    pub created_at: String,
    pub created_date: String,
    /// A field client code is not told about: clients must keep it.
    pub template_hash: String,
    pub is_classified: bool,
    pub is_extracted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_last_digits: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_party: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sms_sub_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sms_type: Option<&'static str>,
    pub sender_name: &'static str,
    pub sender_type: &'static str,
    pub sms_nlp_tag: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique_pan: Option<String>,
    pub is_transactional: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_number_nlp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_nlp: Option<f64>,
    pub unique_pan_nlp: String,
}

struct Bank {
    sender: &'static str,
    name: &'static str,
    short: &'static str,
}

const BANKS: &[Bank] = &[
    Bank {
        sender: "sbiupi",
        name: "state bank of india",
        short: "sbi",
    },
    Bank {
        sender: "hdfcbk",
        name: "hdfc bank",
        short: "hdfc bank",
    },
    Bank {
        sender: "icicib",
        name: "icici bank",
        short: "icici bank",
    },
    Bank {
        sender: "axisbk",
        name: "axis bank",
        short: "axis bank",
    },
    Bank {
        sender: "kotakb",
        name: "kotak mahindra bank",
        short: "kotak",
    },
    Bank {
        sender: "pnbsms",
        name: "punjab national bank",
        short: "pnb",
    },
    Bank {
        sender: "airbnk",
        name: "airtel payments bank",
        short: "airtel payments bank",
    },
];

const PARTIES: &[&str] = &[
    "vinod kumar sah",
    "anita sharma",
    "ramesh traders",
    "sunil kirana store",
    "priya enterprises",
    "mohammed irfan",
    "lakshmi medicals",
    "gupta general store",
];

const MERCHANTS: &[&str] = &[
    "amazon pay india",
    "swiggy",
    "zomato",
    "flipkart internet",
    "indian oil petrol pump",
    "big bazaar",
    "reliance smart",
    "uber india",
];

const LENDERS: &[&str] = &[
    "bajaj finance",
    "tata capital",
    "home credit",
    "muthoot finance",
];

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];

/// Who asked, for the identity fields of every entry.
pub struct SmsRequest<'a> {
    pub seed: u64,
    pub user_id: &'a str,
    pub client_id: &'a str,
    pub request_id: &'a str,
    /// When the user's data became ready (Unix ms): messages predate it.
    pub ready_at_ms: u64,
    pub count: usize,
}

/// Generates `count` entries for the user, newest first. Entry `i` is the
/// same whatever `count` is, so a lower threshold yields a prefix.
pub fn generate(req: &SmsRequest<'_>) -> Vec<SmsEntry> {
    let mut dice = Dice::new(req.seed, "sms", Provider::Credeau, req.user_id, 0);
    let id_base: u32 = dice.rng().random_range(0x6000_0000..0x7000_0000);
    let mut sms_id: u64 = dice.rng().random_range(1_000_000..2_000_000);
    let created_at = credeau_timestamp(req.ready_at_ms);
    let created_date = created_at.get(..10).unwrap_or_default().to_owned();
    let mut inbox_ms = req.ready_at_ms.saturating_sub(3_600_000);
    let own_bank = BANKS.choose(dice.rng()).unwrap_or(&BANKS[0]);
    let own_last4 = format!("{:04}", dice.rng().random_range(0..10_000));
    let mut out = Vec::with_capacity(req.count);
    for i in 0..req.count {
        let rng = dice.rng();
        inbox_ms = inbox_ms.saturating_sub(rng.random_range(60_000..14_400_000));
        sms_id = sms_id.saturating_sub(rng.random_range(1..4));
        let tail: u64 = rng.random();
        let entry = SmsEntry {
            id: format!("{id_base:08x}{:016x}", tail ^ i as u64),
            user_id: req.user_id.to_owned(),
            client_id: req.client_id.to_owned(),
            request_id: req.request_id.to_owned(),
            sms_id: sms_id.to_string(),
            sms_sender: "",
            sms_inbox_date: credeau_timestamp(inbox_ms),
            sms_body: String::new(),
            created_at: created_at.clone(),
            created_date: created_date.clone(),
            template_hash: dice.hex_id(16),
            is_classified: true,
            is_extracted: false,
            account_last_digits: None,
            transaction: None,
            transaction_party: None,
            sms_sub_type: None,
            sms_type: None,
            sender_name: "",
            sender_type: "bank",
            sms_nlp_tag: "",
            unique_pan: None,
            is_transactional: false,
            transaction_type: None,
            acc_number_nlp: None,
            transaction_nlp: None,
            unique_pan_nlp: String::new(),
        };
        out.push(fill(entry, &mut dice, own_bank, &own_last4, inbox_ms));
    }
    out
}

fn day_month(unix_ms: u64) -> (String, String) {
    let ts = credeau_timestamp(unix_ms);
    // "YYYY-MM-DD ...": the slices exist because the format is fixed-width.
    let (y, m, d) = (
        ts.get(2..4).unwrap_or("25"),
        ts.get(5..7).unwrap_or("01"),
        ts.get(8..10).unwrap_or("01"),
    );
    let month = m
        .parse::<usize>()
        .ok()
        .and_then(|m| MONTHS.get(m.wrapping_sub(1)))
        .unwrap_or(&"jan");
    (format!("{d}{month}{y}"), format!("{d}-{m}-{y}"))
}

fn amount(dice: &mut Dice, lo: u32, hi: u32) -> f64 {
    let rupees = dice.rng().random_range(lo..hi);
    if dice.rng().random_bool(0.3) {
        f64::from(rupees) + f64::from(dice.rng().random_range(1..100u32)) / 100.0
    } else {
        f64::from(rupees)
    }
}

fn transactional(e: &mut SmsEntry, bank: &Bank, last4: &str, amt: f64, debit: bool) {
    e.is_extracted = true;
    e.is_transactional = true;
    e.account_last_digits = Some(last4.to_owned());
    e.transaction = Some(amt);
    e.transaction_nlp = Some(amt);
    e.acc_number_nlp = Some(format!("x{last4}"));
    e.sms_sub_type = Some("bank");
    e.transaction_type = Some(if debit {
        "debit-transaction"
    } else {
        "credit-transaction"
    });
    let pan = format!("bank | {} | {}", bank.name, &last4[2..]);
    e.unique_pan = Some(pan.clone());
    e.unique_pan_nlp = pan;
}

fn fill(mut e: SmsEntry, dice: &mut Dice, own: &Bank, last4: &str, inbox_ms: u64) -> SmsEntry {
    let (dmy_word, dmy) = day_month(inbox_ms);
    let kind = dice.rng().random_range(0..100u32);
    let refno: u64 = dice.rng().random_range(100_000_000_000..999_999_999_999);
    let party = *PARTIES.choose(dice.rng()).unwrap_or(&PARTIES[0]);
    let merchant = *MERCHANTS.choose(dice.rng()).unwrap_or(&MERCHANTS[0]);
    let balance = amount(dice, 500, 250_000);
    e.sms_sender = own.sender;
    e.sender_name = own.name;
    match kind {
        0..=29 => {
            let amt = amount(dice, 20, 5_000);
            e.sms_body = format!("dear upi user a/c x{last4} debited by {amt:.1} on date {dmy_word} trf to {party} refno {refno} if not u? call-1800111109 for other services-18001234-{}", own.short);
            transactional(&mut e, own, last4, amt, true);
            e.transaction_party = Some(party.to_owned());
            e.sms_type = Some("account_debit_executed");
            e.sms_nlp_tag = "account_debit_executed_transfer_out";
        }
        30..=49 => {
            let amt = amount(dice, 100, 50_000);
            e.sms_body = format!("a/c xx{last4} credited with inr {amt:.2} on {dmy} by upi ref no {refno} from {party}. avl bal inr {balance:.2}. not you? call 18002586161 - {}", own.short);
            transactional(&mut e, own, last4, amt, false);
            e.transaction_party = Some(party.to_owned());
            e.sms_type = Some("account_credit_executed");
            e.sms_nlp_tag = "account_credit_executed_transfer_in";
        }
        50..=61 => {
            let amt = amount(dice, 50, 20_000);
            let card = format!("{:04}", dice.rng().random_range(0..10_000));
            e.sms_body = format!("inr {amt:.2} spent on {} credit card xx{card} on {dmy} at {merchant}. avl limit: inr {balance:.2}. not you? call 18002581234 to block your card now", own.short);
            transactional(&mut e, own, &card, amt, true);
            e.sms_sub_type = Some("card");
            e.sms_type = Some("card_debit_executed");
            e.sms_nlp_tag = "credit_card_spend";
        }
        62..=67 => {
            let amt = f64::from(dice.rng().random_range(12u32..90) * 1000);
            e.sms_body = format!("dear customer, your a/c xx{last4} is credited with inr {amt:.2} on {dmy} towards salary from {party} payroll. available balance inr {balance:.2}. - {}", own.short);
            transactional(&mut e, own, last4, amt, false);
            e.sms_type = Some("salary_credit");
            e.sms_nlp_tag = "account_credit_executed_salary";
        }
        68..=75 => {
            let lender = *LENDERS.choose(dice.rng()).unwrap_or(&LENDERS[0]);
            let amt = f64::from(dice.rng().random_range(15u32..400) * 10);
            let loan = dice.rng().random_range(1000..10_000u32);
            e.sms_sender = "bjfinc";
            e.sender_name = lender;
            e.sender_type = "nbfc";
            e.sms_body = format!("dear customer, emi of rs {amt:.0} for your loan a/c xxxx{loan} is due on {dmy}. please maintain sufficient balance to avoid penal charges and bounce fees. - {lender}");
            e.is_extracted = true;
            e.transaction = Some(amt);
            e.sms_sub_type = Some("loan");
            e.sms_type = Some("emi_due_reminder");
            e.sms_nlp_tag = "loan_emi_due";
            e.unique_pan_nlp = format!("nbfc | {lender} | -1");
        }
        76..=81 => {
            let amt = amount(dice, 500, 10_000);
            let card = format!("{:04}", dice.rng().random_range(0..10_000));
            e.sms_body = format!("txn of rs. {amt:.0} using {} card {card} declined due to incorrect pin attempts. your card is temporary blocked. if not you, call 18001801234", own.name);
            e.is_classified = false;
            e.sms_nlp_tag = "transaction_delined";
            e.unique_pan_nlp = format!("bank | {} | -1", own.name);
        }
        _ => {
            e.sms_body = format!("you have successfully registered for upi payment on {}. if not you, please report immediately to your bank helpline no 18001802222. do not share your card details/otp/atm pin with anyone.", own.short);
            e.sms_sub_type = Some("not_in_the_list");
            e.sms_type = Some("not_in_the_list");
            e.sms_nlp_tag = "other_notification_bank";
            e.unique_pan_nlp = format!("bank | {} | -1", own.name);
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(count: usize) -> SmsRequest<'static> {
        SmsRequest {
            seed: 42,
            user_id: "u-1",
            client_id: "c",
            request_id: "r",
            ready_at_ms: 1_758_800_000_000,
            count,
        }
    }

    #[test]
    fn same_user_same_messages_and_a_lower_count_is_a_prefix() {
        let all = generate(&req(50));
        assert_eq!(all, generate(&req(50)));
        assert_eq!(all[..10], generate(&req(10))[..]);
        let other = generate(&SmsRequest {
            user_id: "u-2",
            ..req(50)
        });
        assert_ne!(all[0].sms_body, other[0].sms_body);
    }

    #[test]
    fn bodies_are_realistic_lengths_and_dates_go_back_in_time() {
        let all = generate(&req(500));
        let mean = all.iter().map(|e| e.sms_body.len()).sum::<usize>() / all.len();
        assert!((140..=210).contains(&mean), "mean body length {mean}");
        assert!(all
            .windows(2)
            .all(|w| w[0].sms_inbox_date >= w[1].sms_inbox_date));
        assert!(all.iter().any(|e| e.transaction.is_some()));
        assert!(all.iter().any(|e| e.transaction.is_none()));
    }
}
