//! Asking the provider simulator directly: its admin endpoints and the
//! answers it gives for a user.

/// PUTs a JSON body to one of the simulator's admin endpoints.
pub async fn sim_admin(base_url: &str, path: &str, body: &serde_json::Value) {
    let r = reqwest::Client::new()
        .put(format!("{base_url}{path}"))
        .json(body)
        .send()
        .await
        .expect("simulator admin");
    assert!(r.status().is_success(), "PUT {path}: {}", r.status());
}

/// The simulator's Credeau answer for `user`, asked for by hand: (status,
/// body text).
pub async fn credeau_answer(
    base_url: &str,
    client_id: &str,
    token: &str,
    user: &str,
) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("{base_url}/api/fetch_extracted_data"))
        .header("x-client-id", client_id)
        .header("x-auth-token", token)
        .json(&serde_json::json!({"user_id": user, "client_id": client_id}))
        .send()
        .await
        .expect("simulator answers");
    let status = r.status().as_u16();
    (status, r.text().await.expect("answer text"))
}

/// The SMS bodies (of 20 characters or more, so a hit is never chance) the
/// simulator holds for `user`, asked for directly. Its answers are
/// deterministic per user, so these are the bodies the service received.
pub async fn sms_bodies(base_url: &str, client_id: &str, token: &str, user: &str) -> Vec<String> {
    let (status, text) = credeau_answer(base_url, client_id, token, user).await;
    assert_eq!(status, 200, "SMS of {user}: {text}");
    let answer: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    answer["extracted_sms_data"]
        .as_array()
        .expect("SMS data")
        .iter()
        .filter_map(|e| e["sms_body"].as_str())
        .filter(|b| b.len() >= 20)
        .map(str::to_string)
        .collect()
}
