//! Keeping an endpoint's secrets out of what is stored of its answers.
//!
//! A receiver's error page may echo the request it got: its Authorization
//! header, the signature, the start of the body. What the attempt log and
//! the error log keep of an answer (its excerpt, the reason in the error
//! message) is therefore cleaned of every value the endpoint sends that may
//! be a secret: each header value and each long word of it, the user and
//! password of a Basic header, the signing secret, and the signature of the
//! request. Each becomes [redacted].

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// What replaces a secret.
pub const REDACTED: &str = "[redacted]";

/// Shortest text that is redacted: shorter header words ("Basic", a team
/// name) say nothing.
const SHORTEST: usize = 8;

#[derive(Clone, Default, PartialEq)]
pub struct Redactor {
    /// Longest first, so that a secret is masked before a part of it.
    secrets: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} secrets)", self.secrets.len())
    }
}

impl Redactor {
    /// The secrets of an endpoint: its header values and signing secret.
    pub fn new<'a>(
        header_values: impl IntoIterator<Item = &'a str>,
        secret: Option<&str>,
    ) -> Redactor {
        let mut redactor = Redactor::default();
        for value in header_values {
            redactor.add(value);
            for word in value.split_whitespace() {
                redactor.add(word);
                // Basic credentials: the pair and the password, decoded.
                if let Ok(decoded) = STANDARD.decode(word) {
                    if let Ok(pair) = String::from_utf8(decoded) {
                        if let Some((_, password)) = pair.split_once(':') {
                            redactor.add(password);
                        }
                        redactor.add(&pair);
                    }
                }
            }
        }
        if let Some(secret) = secret {
            redactor.add(secret);
            redactor.add(secret.strip_prefix("whsec_").unwrap_or(secret));
        }
        redactor
    }

    /// Adds a secret (ignored when short).
    pub fn add(&mut self, secret: &str) {
        let secret = secret.trim();
        if secret.chars().count() < SHORTEST || self.secrets.iter().any(|s| s == secret) {
            return;
        }
        let at = self
            .secrets
            .partition_point(|known| known.len() >= secret.len());
        self.secrets.insert(at, secret.to_string());
    }

    /// `text` with every secret replaced.
    pub fn apply(&self, text: &str) -> String {
        let mut text = text.to_string();
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), REDACTED);
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_secrets_are_masked() {
        // "n8n:s3cret-pass" in base64
        let redactor = Redactor::new(
            [
                "Basic bjhuOnMzY3JldC1wYXNz",
                "growth",
                "Bearer tok_9f8e7d6c5b",
            ],
            Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        );
        let echo = "got Authorization: Basic bjhuOnMzY3JldC1wYXNz (user n8n:s3cret-pass, \
                    password s3cret-pass), Bearer tok_9f8e7d6c5b, key MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw, \
                    team growth";
        let clean = redactor.apply(echo);
        for secret in [
            "bjhuOnMzY3JldC1wYXNz",
            "s3cret-pass",
            "tok_9f8e7d6c5b",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ] {
            assert!(!clean.contains(secret), "{secret} in {clean}");
        }
        assert!(clean.contains("Authorization: [redacted]"), "{clean}");
        assert!(clean.contains("team growth"), "short words stay: {clean}");
        assert_eq!(Redactor::new([], None).apply("as it was"), "as it was");
    }
}
