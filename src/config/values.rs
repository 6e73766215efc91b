//! Value types and the serde adapters the sections share: URLs, duration
//! lists, and scalars read leniently (the empty string is unset).

use std::path::PathBuf;

use serde::{Deserialize, Serialize, Serializer};

/// An optional value as configured: unset is the empty string.
pub(super) fn show_path(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Scalars read as text whatever their type: a section with flattened
/// parts is read through a buffer, which keeps an environment variable
/// that looks like a number (`INSIGHTS__CREDEAU__CLIENT_ID=1234`) a number
/// where the `config` crate alone would have handed it over as text. And
/// the empty string, in TOML or the environment, means "unset".
pub(super) mod lenient {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Any scalar, as text.
    pub struct Scalar(pub String);

    impl<'de> Deserialize<'de> for Scalar {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl serde::de::Visitor<'_> for V {
                type Value = Scalar;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a string")
                }
                fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_unit<E: serde::de::Error>(self) -> Result<Scalar, E> {
                    Ok(Scalar(String::new()))
                }
                fn visit_none<E: serde::de::Error>(self) -> Result<Scalar, E> {
                    Ok(Scalar(String::new()))
                }
            }
            d.deserialize_any(V)
        }
    }

    /// `None` for the empty string.
    pub fn optional(s: String) -> Option<String> {
        (!s.is_empty()).then_some(s)
    }

    pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Scalar::deserialize(d).map(|s| s.0)
    }

    pub fn string_map<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, String>, D::Error> {
        let map = BTreeMap::<String, Scalar>::deserialize(d)?;
        Ok(map.into_iter().map(|(k, v)| (k, v.0)).collect())
    }

    /// An optional text: empty = unset.
    pub mod opt_string {
        use super::*;
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
            Ok(optional(Scalar::deserialize(d)?.0))
        }
        pub fn serialize<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(v.as_deref().unwrap_or(""))
        }
    }

    /// An optional file path: empty = unset.
    pub mod opt_path {
        use super::*;
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
            Ok(optional(Scalar::deserialize(d)?.0).map(PathBuf::from))
        }
        pub fn serialize<S: Serializer>(v: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&super::super::show_path(v))
        }
    }

    /// An optional http(s) URL: empty = unset.
    pub mod opt_url {
        use super::*;
        use crate::config::HttpUrl;
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<HttpUrl>, D::Error> {
            optional(Scalar::deserialize(d)?.0)
                .map(|s| HttpUrl::parse(&s).map_err(serde::de::Error::custom))
                .transpose()
        }
        pub fn serialize<S: Serializer>(v: &Option<HttpUrl>, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&v.as_ref().map(HttpUrl::redacted).unwrap_or_default())
        }
    }
}

/// An absolute `https` URL (or `http`, for a local simulator) with a host,
/// checked when the configuration is read. Shown (`Display`, `Debug`, the
/// redacted TOML) with any `user:password@` replaced by `<redacted>@`; the
/// sections refuse such URLs, so this only guards what reaches a screen.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpUrl(url::Url);

impl HttpUrl {
    pub fn parse(value: &str) -> Result<HttpUrl, String> {
        let url = url::Url::parse(value).map_err(|e| format!("not a URL ({e})"))?;
        match url.scheme() {
            "https" | "http" => {}
            // The scheme is not quoted: it may be the start of a secret
            // pasted into the wrong key (`key:secret`).
            _ => return Err("scheme must be https (or http for a local simulator)".to_string()),
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err("has no host".to_string());
        }
        Ok(HttpUrl(url))
    }
    /// The URL as given, credentials included: for sending requests only,
    /// never for printing (use `Display`).
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
    /// Whether it holds a user name or a password (`user:password@host`).
    pub fn has_credentials(&self) -> bool {
        !self.0.username().is_empty() || self.0.password().is_some()
    }
    /// The URL with its credentials, if any, shown as `<redacted>`.
    pub fn redacted(&self) -> String {
        if !self.has_credentials() {
            return self.0.as_str().to_string();
        }
        let mut bare = self.0.clone();
        // Both only fail for URLs that cannot hold credentials, and this
        // one holds some.
        let _ = bare.set_username("");
        let _ = bare.set_password(None);
        let text = bare.as_str();
        match text.split_once("://") {
            Some((scheme, rest)) => format!("{scheme}://<redacted>@{rest}"),
            None => text.to_string(),
        }
    }
    pub fn url(&self) -> &url::Url {
        &self.0
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl std::fmt::Debug for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("HttpUrl").field(&self.redacted()).finish()
    }
}

impl<'de> Deserialize<'de> for HttpUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        HttpUrl::parse(&lenient::string(d)?).map_err(serde::de::Error::custom)
    }
}

impl Serialize for HttpUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// A list of humantime durations, from TOML (`["10s", "1m"]`) or from one
/// environment variable (`"10s,1m"`).
pub(super) mod humantime_list {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrString {
        List(Vec<String>),
        One(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let items = match ListOrString::deserialize(d)? {
            ListOrString::List(v) => v,
            ListOrString::One(s) => s
                .split(',')
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect(),
        };
        items
            .iter()
            .map(|s| {
                humantime::parse_duration(s).map_err(|e| {
                    // humantime quotes an unknown unit, part of the value.
                    let why = match e {
                        humantime::DurationError::UnknownUnit { .. } => {
                            "unknown time unit".to_string()
                        }
                        other => other.to_string(),
                    };
                    serde::de::Error::custom(format!(
                        "not a list of durations such as \"1s,5m\" ({why})"
                    ))
                })
            })
            .collect()
    }

    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|d| humantime::format_duration(*d).to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_env::*;
    use crate::config::Settings;

    /// An empty string (the documented default) means unset; values that
    /// look like numbers stay text where text is expected.
    #[test]
    fn empty_strings_are_unset_and_numeric_looking_text_stays_text() {
        let s = Settings::load_from(None, base_env()).unwrap();
        assert_eq!(s.kafka.sasl_mechanism, None);
        assert_eq!(s.kafka.ssl_ca_location, None);
        assert_eq!(s.encoding.schema_registry_url, None);
        assert_eq!(s.finbox.http.ca_bundle, None);
        assert!(s.to_redacted_toml().contains("schema_registry_url = \"\""));
        let s = Settings::load_from(
            None,
            with(&[
                ("INSIGHTS__CREDEAU__CLIENT_ID", "12345"),
                ("INSIGHTS__KAFKA__GROUP_ID", "42"),
                ("INSIGHTS__KAFKA__EXTRA__LINGER_MS", "5"),
                ("INSIGHTS__FINBOX__API_KEY", "987654"),
                (
                    "INSIGHTS__ENCODING__SCHEMA_REGISTRY_URL",
                    "http://registry:8081",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(s.credeau.client_id, "12345");
        assert_eq!(s.kafka.group_id, "42");
        assert_eq!(s.finbox.api_key.expose(), "987654");
        assert_eq!(
            s.encoding.schema_registry_url.as_ref().map(HttpUrl::as_str),
            Some("http://registry:8081/")
        );
        let t = err_text(with(&[(
            "INSIGHTS__ENCODING__SCHEMA_REGISTRY_URL",
            "ftp://r",
        )]));
        assert!(t.contains("encoding.schema_registry_url"), "{t}");
        assert!(t.contains("scheme must be https"), "{t}");
    }
}
