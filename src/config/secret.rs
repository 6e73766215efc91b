//! Secrets: a value or the file it is read from, held in `secrecy` and
//! never printed.

use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use serde::Serializer;

use super::problem::ConfigError;
use super::values::{lenient, show_path};

/// A secret and the file it may be read from instead (`<key>` and
/// `<key>_file`, side by side in their section). The file is read once, at
/// load; the value is held in `secrecy` and never printed: `Debug` and the
/// redacted TOML show `<redacted>` (or nothing when unset), the file's path
/// is shown as given.
#[derive(Clone, Default)]
pub struct SecretSource {
    value: Option<SecretString>,
    file: Option<PathBuf>,
    /// The value came from `file` (already read).
    read: bool,
}

impl SecretSource {
    /// A secret given as a value (an empty one is unset).
    pub fn new(value: impl Into<String>) -> Self {
        let v: String = value.into();
        SecretSource {
            value: (!v.is_empty()).then(|| SecretString::from(v)),
            file: None,
            read: false,
        }
    }
    /// Whether there is a value (given, or read from the file).
    pub fn is_set(&self) -> bool {
        self.value
            .as_ref()
            .is_some_and(|s| !s.expose_secret().is_empty())
    }
    /// Whether a value or a file was given.
    pub(super) fn is_given(&self) -> bool {
        self.is_set() || self.file.is_some()
    }
    /// The secret's value; call only where it is sent to its destination.
    pub fn expose(&self) -> &str {
        self.value.as_ref().map(|s| s.expose_secret()).unwrap_or("")
    }
    /// Reads the file, if one was given (once; `key` names the secret in
    /// errors, `<key>_file` the file).
    pub(super) fn resolve(&mut self, key: &str) -> Result<(), ConfigError> {
        let Some(file) = self.file.as_ref().filter(|_| !self.read) else {
            return Ok(());
        };
        let file_key = format!("{key}_file");
        if self.is_set() {
            return Err(ConfigError::invalid(
                &file_key,
                format!("set both {key} and {key}_file; choose one"),
            ));
        }
        let shown = file.display();
        let text = std::fs::read_to_string(file)
            .map_err(|e| ConfigError::invalid(&file_key, format!("cannot read {shown}: {e}")))?;
        let value = text.trim_end_matches(['\n', '\r']);
        if value.is_empty() {
            return Err(ConfigError::invalid(&file_key, format!("{shown} is empty")));
        }
        self.value = Some(SecretString::from(value.to_string()));
        self.read = true;
        Ok(())
    }

    /// Reads the pair `keys` (`[<key>, <key>_file]`) from a section
    /// (through `#[serde(flatten)]`).
    pub(super) fn deserialize_keys<'de, D: serde::Deserializer<'de>>(
        d: D,
        keys: &'static [&'static str; 2],
    ) -> Result<Self, D::Error> {
        struct Pair(&'static [&'static str; 2]);
        impl<'de> serde::de::Visitor<'de> for Pair {
            type Value = SecretSource;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{} or {}", self.0[0], self.0[1])
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<SecretSource, A::Error> {
                let mut out = SecretSource::default();
                while let Some(key) = map.next_key::<String>()? {
                    if key == self.0[0] {
                        out.value = lenient::optional(map.next_value::<lenient::Scalar>()?.0)
                            .map(SecretString::from);
                    } else if key == self.0[1] {
                        out.file = lenient::optional(map.next_value::<lenient::Scalar>()?.0)
                            .map(PathBuf::from);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_struct("SecretSource", keys, Pair(keys))
    }

    pub(super) fn serialize_keys<S: Serializer>(
        &self,
        s: S,
        keys: &'static [&'static str; 2],
    ) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("SecretSource", 2)?;
        st.serialize_field(keys[0], if self.is_set() { "<redacted>" } else { "" })?;
        st.serialize_field(keys[1], &show_path(&self.file))?;
        st.end()
    }
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_set() {
            "<redacted>"
        } else {
            "<unset>"
        })?;
        if let Some(file) = &self.file {
            write!(f, " (file {})", file.display())?;
        }
        Ok(())
    }
}

/// The (de)serialisation of one `<key>` / `<key>_file` pair, for
/// `#[serde(flatten, with = "...")]`.
macro_rules! secret_keys {
    ($module:ident, $value:literal, $file:literal) => {
        mod $module {
            const KEYS: &[&str; 2] = &[$value, $file];
            pub fn deserialize<'de, D: serde::Deserializer<'de>>(
                d: D,
            ) -> Result<$crate::config::SecretSource, D::Error> {
                $crate::config::SecretSource::deserialize_keys(d, KEYS)
            }
            pub fn serialize<S: serde::Serializer>(
                v: &$crate::config::SecretSource,
                s: S,
            ) -> Result<S::Ok, S::Error> {
                v.serialize_keys(s, KEYS)
            }
        }
    };
}
pub(super) use secret_keys;

#[cfg(test)]
mod tests {
    use crate::config::test_env::*;
    use crate::config::Settings;

    #[test]
    fn secrets_from_files_and_redacted_output() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "file-token-value\n").unwrap();
        let mut env: Vec<_> = base_env()
            .into_iter()
            .filter(|(k, _)| k != "INSIGHTS__CREDEAU__AUTH_TOKEN")
            .collect();
        env.push((
            "INSIGHTS__CREDEAU__AUTH_TOKEN_FILE".into(),
            p.display().to_string(),
        ));
        let s = Settings::load_from(None, env).unwrap();
        assert_eq!(s.credeau.auth_token.expose(), "file-token-value");
        let shown = s.to_redacted_toml();
        assert!(!shown.contains("file-token-value"));
        assert!(!shown.contains("fb-key"));
        assert!(!shown.contains("fb-hash"));
        assert!(shown.contains("<redacted>"));
        assert!(!format!("{s:?}").contains("fb-key"));
    }

    /// A secret file is read once, at load; the value is never shown.
    #[test]
    fn a_secret_source_reads_its_file_once_and_never_shows_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hash");
        std::fs::write(&p, "hash-from-file\n").unwrap();
        let env: Vec<_> = base_env()
            .into_iter()
            .filter(|(k, _)| k != "INSIGHTS__FINBOX__SERVER_HASH")
            .chain([(
                "INSIGHTS__FINBOX__SERVER_HASH_FILE".to_string(),
                p.display().to_string(),
            )])
            .collect();
        let s = Settings::load_from(None, env).unwrap();
        std::fs::remove_file(&p).unwrap();
        let mut again = s.finbox.server_hash.clone();
        again.resolve("finbox.server_hash").unwrap();
        assert_eq!(again.expose(), "hash-from-file");
        let shown = format!("{:?}", s.finbox.server_hash);
        assert!(!shown.contains("hash-from-file"), "{shown}");
        assert!(shown.contains(&p.display().to_string()), "{shown}");
        s.validate().unwrap();
    }
}
