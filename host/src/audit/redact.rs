//! Redaction: what must never reach the audit log or the policy input in clear. Values of secret headers
//! and query parameters are replaced; the paths of what was replaced are recorded, never the values.

/// What must never reach the log or the policy input in clear.
#[derive(Clone, Debug)]
pub struct Redactor {
    headers: Vec<String>,
    query_params: Vec<String>,
    /// Host-only key for keyed digests of redacted values; `None` keeps no digest.
    key: Option<Vec<u8>>,
}

pub const REDACTED: &str = "[redacted]";

/// Parts of a name that make a header or query parameter secret even when no list names it.
const SECRET_WORDS: &[&str] = &[
    "token",
    "secret",
    "password",
    "passwd",
    "apikey",
    "api-key",
    "api_key",
    "signature",
    "credential",
    "session",
    "cookie",
    "authorization",
];

/// What one redaction replaced: where (a field path) and, with a key, a digest that lets equal secrets
/// be correlated without being readable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redaction {
    pub path: String,
    pub digest: Option<String>,
}

impl Redactor {
    pub fn new(headers: &[String], query_params: &[String], key: Option<Vec<u8>>) -> Self {
        Redactor {
            headers: headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
            query_params: query_params
                .iter()
                .map(|q| q.to_ascii_lowercase())
                .collect(),
            key,
        }
    }

    pub fn is_secret_header(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.headers.contains(&name) || SECRET_WORDS.iter().any(|w| name.contains(w))
    }

    pub fn is_secret_param(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.query_params.contains(&name) || SECRET_WORDS.iter().any(|w| name.contains(w))
    }

    /// `hmac-sha256:<hex>` of `value` under the host-only key.
    pub fn digest(&self, value: &[u8]) -> Option<String> {
        use hmac::Mac;
        let key = self.key.as_ref()?;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).ok()?;
        mac.update(value);
        Some(format!(
            "hmac-sha256:{}",
            hex::encode(mac.finalize().into_bytes())
        ))
    }

    /// The header value as it may be shown, and the redaction if it was secret.
    pub fn header(&self, name: &str, value: &[u8]) -> (String, Option<Redaction>) {
        if self.is_secret_header(name) {
            let redaction = Redaction {
                path: format!("request.headers.{}", name.to_ascii_lowercase()),
                digest: self.digest(value),
            };
            (REDACTED.to_string(), Some(redaction))
        } else {
            (String::from_utf8_lossy(value).into_owned(), None)
        }
    }

    /// The URL with the values of secret query parameters replaced.
    pub fn url(&self, url: &url::Url) -> String {
        self.url_with_redactions(url).0
    }

    pub fn url_with_redactions(&self, url: &url::Url) -> (String, Vec<Redaction>) {
        self.redact_url(url, "request.query", 0)
    }

    /// Free text (an error message, a quoted `Location`) as it may be written: every URL in it with its
    /// secret parameters replaced, and any other `name=value` whose name is secret (a relative
    /// `/cb?access_token=...`) with its value replaced.
    pub fn text(&self, text: &str) -> String {
        const STOP: &[char] = &['"', '\'', '<', '>', '(', ')', '[', ']', '{', '}', '`'];
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = find_url(rest) {
            out.push_str(&self.pairs(&rest[..at]));
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| c.is_whitespace() || c.is_control() || STOP.contains(&c))
                .unwrap_or(tail.len());
            let candidate = tail[..end].trim_end_matches(['.', ',', ';', ':', '!', '?']);
            match url::Url::parse(candidate) {
                Ok(url) => out.push_str(&self.pairs(&self.url(&url))),
                Err(_) => out.push_str(&self.pairs(candidate)),
            }
            rest = &tail[candidate.len()..];
        }
        out.push_str(&self.pairs(rest));
        out
    }

    /// `name=value` pairs in `text` whose name is secret, with the value replaced.
    fn pairs(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(eq) = rest.find('=') {
            let before = &rest[..eq];
            // After the last character that cannot be in a name (which may be several bytes long).
            let name_start = before
                .char_indices()
                .rev()
                .find(|(_, c)| !(c.is_ascii_alphanumeric() || "-_.".contains(*c)))
                .map_or(0, |(i, c)| i + c.len_utf8());
            let name = &before[name_start..];
            let after = &rest[eq + 1..];
            let value_end = after
                .find(|c: char| c.is_whitespace() || "&;#\"'<>,)".contains(c))
                .unwrap_or(after.len());
            out.push_str(&rest[..=eq]);
            if !name.is_empty()
                && self.is_secret_param(name)
                && value_end > 0
                && &after[..value_end] != REDACTED
            {
                out.push_str(REDACTED);
            } else {
                out.push_str(&after[..value_end]);
            }
            rest = &after[value_end..];
        }
        out.push_str(rest);
        out
    }

    /// A parameter whose value is itself a URL (`redirect_uri=`, `next=`) has that URL's query redacted
    /// too, a few levels deep.
    fn redact_url(&self, url: &url::Url, prefix: &str, depth: u8) -> (String, Vec<Redaction>) {
        if url.query().is_none() {
            return (url.to_string(), Vec::new());
        }
        let mut redactions = Vec::new();
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let path = format!("{prefix}.{k}");
                if self.is_secret_param(&k) {
                    redactions.push(Redaction {
                        path,
                        digest: self.digest(v.as_bytes()),
                    });
                    return (k.into_owned(), REDACTED.to_string());
                }
                match url::Url::parse(&v) {
                    Ok(inner) if depth < 3 && inner.query().is_some() => {
                        let (shown, inner_redactions) = self.redact_url(&inner, &path, depth + 1);
                        redactions.extend(inner_redactions);
                        (k.into_owned(), shown)
                    }
                    _ => (k.into_owned(), v.into_owned()),
                }
            })
            .collect();
        let mut redacted = url.clone();
        redacted.query_pairs_mut().clear().extend_pairs(pairs);
        (redacted.to_string(), redactions)
    }
}

/// Where the next `http://` or `https://` URL starts in `text`, any case.
fn find_url(text: &str) -> Option<usize> {
    let lower = text.to_ascii_lowercase();
    [lower.find("http://"), lower.find("https://")]
        .into_iter()
        .flatten()
        .min()
}

/// The host-only key for redaction digests: read from `path`, or created there (32 random bytes, 0600).
pub fn load_or_create_key(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read(path) {
        Ok(key) if key.len() >= 32 => Ok(key),
        Ok(_) => Err(std::io::Error::other(format!(
            "{}: a redaction key must be at least 32 bytes",
            path.display()
        ))),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let mut key = vec![0u8; 32];
            getrandom::fill(&mut key).map_err(|err| std::io::Error::other(err.to_string()))?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            file.write_all(&key)?;
            file.sync_all()?;
            Ok(key)
        }
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_secret_pairs_in_free_text_are_redacted() {
        let r = Redactor::new(&[], &["key".into()], None);
        let text = r.text(
            "error sending request for url (https://api.test/cb?access_token=tok123&x=1): refused; \
             redirect to HTTP://b.test/x?signature=sig456. and /rel?key=k789&y=2",
        );
        for secret in ["tok123", "sig456", "k789"] {
            assert!(!text.contains(secret), "{text}");
        }
        assert!(
            text.contains("x=1") && text.contains("y=2") && text.contains("refused"),
            "{text}"
        );
        assert_eq!(
            r.text("nothing secret here: a=b"),
            "nothing secret here: a=b"
        );
        // Guest-chosen text (an invalid method quoted in an error) may hold any characters.
        assert_eq!(
            r.text("invalid method \"é=x\" and ü€key=v"),
            "invalid method \"é=x\" and ü€key=[redacted]"
        );
    }

    #[test]
    fn secret_query_values_are_replaced() {
        let r = Redactor::new(
            &["authorization".into()],
            &["api_key".into(), "code".into()],
            Some(vec![7; 32]),
        );
        let url =
            url::Url::parse("https://a.example/p?api_key=s3cret&q=cats&TOKEN=x").expect("url");
        let out = r.url(&url);
        assert!(!out.contains("s3cret") && !out.contains("=x"), "{out}");
        assert!(out.contains("q=cats"), "{out}");
        assert!(r.is_secret_header("Authorization"));
        assert!(
            r.is_secret_header("X-Upstream-Token"),
            "secret-looking names count too"
        );
        assert!(!r.is_secret_header("accept"));
        let (_, redactions) = r.url_with_redactions(
            &url::Url::parse("https://a.example/cb?code=abc&state=1&client_secret=zz")
                .expect("url"),
        );
        let paths: Vec<&str> = redactions.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            paths,
            vec!["request.query.code", "request.query.client_secret"]
        );
    }

    #[test]
    fn urls_nested_in_parameters_are_redacted_too() {
        let r = Redactor::new(&[], &[], None);
        let url = url::Url::parse(
            "https://a.example/login?next=https%3A%2F%2Fb.example%2Fcb%3Faccess_token%3Ds3cret%26x%3D1&q=2",
        )
        .expect("url");
        let (shown, redactions) = r.url_with_redactions(&url);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("q=2"), "{shown}");
        assert_eq!(redactions[0].path, "request.query.next.access_token");
    }

    #[test]
    fn equal_secrets_get_equal_digests_under_one_key_only() {
        let a = Redactor::new(&[], &[], Some(vec![1; 32]));
        let b = Redactor::new(&[], &[], Some(vec![2; 32]));
        assert_eq!(a.digest(b"s3cret"), a.digest(b"s3cret"));
        assert_ne!(a.digest(b"s3cret"), a.digest(b"other"));
        assert_ne!(a.digest(b"s3cret"), b.digest(b"s3cret"));
        let digest = a.digest(b"s3cret").expect("digest");
        assert!(digest.starts_with("hmac-sha256:") && !digest.contains("s3cret"));
        assert_eq!(Redactor::new(&[], &[], None).digest(b"s3cret"), None);
    }
}
