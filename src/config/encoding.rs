//! `[encoding]`: the record formats in and out, and the schema registry.

use serde::{Deserialize, Serialize};

use super::problem::Checks;
use super::secret::secret_keys;
use super::values::{lenient, HttpUrl};
use super::SecretSource;

secret_keys!(
    schema_registry_password_keys,
    "schema_registry_password",
    "schema_registry_password_file"
);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InputEncoding {
    Auto,
    Json,
    Avro,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputEncoding {
    Json,
    Avro,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EncodingSettings {
    pub input: InputEncoding,
    pub output: OutputEncoding,
    /// Needed for Avro in or out; never with credentials in it.
    #[serde(with = "lenient::opt_url")]
    pub schema_registry_url: Option<HttpUrl>,
    /// HTTP basic auth to the registry, with the password below.
    #[serde(with = "lenient::opt_string")]
    pub schema_registry_username: Option<String>,
    /// `schema_registry_password` / `schema_registry_password_file`.
    #[serde(flatten, with = "schema_registry_password_keys")]
    pub schema_registry_password: SecretSource,
    /// Input records larger than this are dead-lettered unparsed.
    pub max_input_bytes: usize,
}

impl EncodingSettings {
    /// The registry's basic-auth credentials, when configured.
    pub fn schema_registry_credentials(&self) -> Option<(&str, &str)> {
        let user = self.schema_registry_username.as_deref()?;
        Some((user, self.schema_registry_password.expose()))
    }

    pub(super) fn validate(&self, errs: &mut Checks) {
        // The URL's form was checked when it was read; its credentials
        // are refused here, where the message can name the keys to use.
        if self
            .schema_registry_url
            .as_ref()
            .is_some_and(HttpUrl::has_credentials)
        {
            errs.fail(
                "encoding.schema_registry_url",
                "must not hold credentials (user:password@); set \
                 encoding.schema_registry_username and encoding.schema_registry_password \
                 (or encoding.schema_registry_password_file) instead",
            );
        }
        // A schema_registry_password_file that could not be read is
        // reported on its own.
        let password = self.schema_registry_password.is_given();
        match (self.schema_registry_username.is_some(), password) {
            (true, false) => errs.fail(
                "encoding.schema_registry_password",
                "is required with encoding.schema_registry_username \
                 (or encoding.schema_registry_password_file)",
            ),
            (false, true) => errs.fail(
                "encoding.schema_registry_username",
                "is required with encoding.schema_registry_password",
            ),
            _ => {}
        }
        let avro = self.output == OutputEncoding::Avro || self.input == InputEncoding::Avro;
        if avro && self.schema_registry_url.is_none() {
            errs.fail(
                "encoding.schema_registry_url",
                "is required when Avro is used",
            );
        }
        if self.max_input_bytes < 1024 {
            errs.fail("encoding.max_input_bytes", "must be at least 1024");
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_env::*;
    use crate::config::{ConfigError, Settings};

    const PASSWORD: &str = "REGSECRETpw5e21";

    #[test]
    fn registry_credentials_come_from_their_own_keys_and_the_password_is_never_shown() {
        let s = Settings::load_from(
            None,
            with(&[
                (
                    "INSIGHTS__ENCODING__SCHEMA_REGISTRY_URL",
                    "https://psrc.example",
                ),
                ("INSIGHTS__ENCODING__SCHEMA_REGISTRY_USERNAME", "SRKEY"),
                ("INSIGHTS__ENCODING__SCHEMA_REGISTRY_PASSWORD", PASSWORD),
            ]),
        )
        .unwrap();
        assert_eq!(
            s.encoding.schema_registry_credentials(),
            Some(("SRKEY", PASSWORD))
        );
        let shown = s.to_redacted_toml();
        assert!(
            shown.contains("schema_registry_password = \"<redacted>\""),
            "{shown}"
        );
        assert!(
            shown.contains("schema_registry_username = \"SRKEY\""),
            "{shown}"
        );
        assert!(!shown.contains(PASSWORD), "{shown}");
        assert!(!format!("{s:?}").contains(PASSWORD));

        // From a file, as the chart mounts it.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("schema-registry-password");
        std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
        let s = Settings::load_from(
            None,
            with(&[
                ("INSIGHTS__ENCODING__SCHEMA_REGISTRY_USERNAME", "SRKEY"),
                (
                    "INSIGHTS__ENCODING__SCHEMA_REGISTRY_PASSWORD_FILE",
                    file.to_str().unwrap(),
                ),
            ]),
        )
        .unwrap();
        assert_eq!(
            s.encoding.schema_registry_credentials(),
            Some(("SRKEY", PASSWORD))
        );
        assert!(!s.to_redacted_toml().contains(PASSWORD));
        // Neither: no basic auth.
        let s = Settings::load_from(None, base_env()).unwrap();
        assert_eq!(s.encoding.schema_registry_credentials(), None);
    }

    #[test]
    fn a_registry_username_and_password_go_together() {
        let t = err_text(with(&[(
            "INSIGHTS__ENCODING__SCHEMA_REGISTRY_USERNAME",
            "SRKEY",
        )]));
        assert!(t.contains("`encoding.schema_registry_password`"), "{t}");
        let t = err_text(with(&[(
            "INSIGHTS__ENCODING__SCHEMA_REGISTRY_PASSWORD",
            PASSWORD,
        )]));
        assert!(t.contains("`encoding.schema_registry_username`"), "{t}");
        assert!(!t.contains(PASSWORD), "{t}");
    }

    #[test]
    fn credentials_in_any_url_are_refused_naming_the_keys_to_use_instead() {
        let url = format!("https://user:{PASSWORD}@host.example");
        for (var, key, instead) in [
            (
                "INSIGHTS__ENCODING__SCHEMA_REGISTRY_URL",
                "encoding.schema_registry_url",
                "encoding.schema_registry_password",
            ),
            (
                "INSIGHTS__FINBOX__BASE_URL",
                "finbox.base_url",
                "finbox.api_key",
            ),
            (
                "INSIGHTS__CREDEAU__BASE_URL",
                "credeau.base_url",
                "credeau.auth_token",
            ),
        ] {
            let e = Settings::load_from(None, with(&[(var, url.as_str())])).unwrap_err();
            let ConfigError::Problems(problems) = &e else {
                panic!("{e}");
            };
            let p = problems.iter().find(|p| p.key == key).expect(key);
            assert!(p.reason.contains("must not hold credentials"), "{p}");
            assert!(p.reason.contains(instead), "{p}");
            let text = e.to_string();
            assert!(!text.contains(PASSWORD), "{text}");
            assert!(!format!("{e:?}").contains(PASSWORD), "{e:?}");
            // A user name alone is refused too.
            let t = err_text(with(&[(var, "https://someone@host.example")]));
            assert!(
                t.contains(key) && t.contains("must not hold credentials"),
                "{t}"
            );
        }
    }

    #[test]
    fn a_url_with_credentials_is_shown_redacted() {
        let url = crate::config::HttpUrl::parse(&format!("https://user:{PASSWORD}@host.example/x"))
            .unwrap();
        assert_eq!(url.to_string(), "https://<redacted>@host.example/x");
        assert!(!format!("{url:?}").contains(PASSWORD));
        assert!(!format!("{url:?}").contains("user"));
        let plain = crate::config::HttpUrl::parse("https://host.example/x").unwrap();
        assert_eq!(plain.to_string(), "https://host.example/x");
    }
}
