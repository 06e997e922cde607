//! Masking secrets in connection URLs and in text that may quote them: one set of rules
//! for every crate, every `Debug`/`Display` of a configuration or error, every error
//! message of a driver and every log line.
//!
//! * [`redact_url`]: one URL (or anything given where a URL was expected) with its
//!   secrets replaced by [`MASK`].
//! * [`redact_text`]: the same for every URL-looking part and every `key=value` pair
//!   with a secret key inside arbitrary text (a driver's error message, a log line).
//! * [`Secrets`]: the secret values of some URLs, to remove them from text that quotes
//!   them outside any URL (a driver that echoes a password on its own).
//! * [`percent_decode`]: the one percent-decoder the workspace uses.
//!
//! What counts as a secret:
//!
//! * the password of the user info, `scheme://user:PASSWORD@host`. The user info ends at
//!   the **last** `@` of the URL, so a password with unencoded reserved characters
//!   (`redis://:ab/cd@host`, `postgres://u:a?b#c@host`) is masked whole. The price: a URL
//!   whose path or query holds an `@` after a `:` is shown with less of it
//!   (`postgres://h:5432/db?x=a@b` becomes `postgres://h:***@b`); percent-encode such an
//!   `@` as `%40`;
//! * a port that is not a number (`redis://:s3cret` with the `@host` forgotten);
//! * the value of every query parameter or `key=value` pair whose key, ignoring case and
//!   any character other than letters and digits, is `pass`, `pwd`, `sslkey`, or ends
//!   in `password`, `passwd`, `secret`, `token` or `apikey` (`password=`,
//!   `sslpassword=`, `ssl-key=`, `client_secret=`, ...). The value runs to the next
//!   `&key=` (so an unencoded `&` inside it is masked too), or to the end of the URL;
//!   inside text it also ends at white space or a quote. A value in single quotes
//!   (libpq's `password='a b'`) is masked up to its closing quote.
//!
//! Lists of URLs (`redis+cluster://:pw@a:1,b:2`, several URLs in one line of text) are
//! handled URL by URL. Text that is not a URL is returned as it is, apart from secret
//! `key=value` pairs and a user info (text before an `@` holding a `:`).
//!
//! ```
//! use flow_core::redact::{redact_text, redact_url};
//!
//! assert_eq!(redact_url("redis://:s3cret@cache:6379/0"), "redis://:***@cache:6379/0");
//! assert_eq!(
//!     redact_url("postgres://db/jobs?user=app&password=s3cret&sslmode=require"),
//!     "postgres://db/jobs?user=app&password=***&sslmode=require"
//! );
//! assert_eq!(
//!     redact_text("cannot connect to redis://:ab/cd@host:6379: refused"),
//!     "cannot connect to redis://:***@host:6379: refused"
//! );
//! ```

use std::borrow::Cow;
use std::fmt;

use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// What a secret is replaced with.
pub const MASK: &str = "***";

/// The shortest secret value [`Secrets::scrub`] removes from text outside URLs.
pub const MIN_SCRUBBED_LEN: usize = 3;

/// `url` with every secret replaced by [`MASK`]: the password of the user info, a port
/// that is not a number, and the values of secret query parameters (see the
/// [module documentation](self) for the rules).
///
/// Never fails: text that is not a URL comes back with only its secret-looking parts
/// masked.
///
/// ```
/// use flow_core::redact::redact_url;
///
/// assert_eq!(redact_url("redis://user:pw@host:6379/0"), "redis://user:***@host:6379/0");
/// assert_eq!(redact_url("rediss+cluster://:pw@a:1,b:2"), "rediss+cluster://:***@a:1,b:2");
/// assert_eq!(redact_url("redis://:ab/cd@host"), "redis://:***@host");
/// assert_eq!(
///     redact_url("postgres://app@db/jobs?sslpassword=x&sslmode=require"),
///     "postgres://app@db/jobs?sslpassword=***&sslmode=require"
/// );
/// assert_eq!(redact_url("memory://"), "memory://");
/// ```
pub fn redact_url(url: &str) -> String {
    let mut out = String::with_capacity(url.len() + MASK.len());
    redact_structure(url, &mut out, &mut |_| {});
    mask_params(&out, Mode::Url, &mut |_| {}).into_owned()
}

/// `text` with every URL-looking part passed through [`redact_url`] and every secret
/// `key=value` pair masked; borrowed back unchanged when there is nothing to mask.
///
/// For messages of drivers and third-party libraries, and for whole log lines. A URL
/// inside text ends at white space, a quote, `<`, `>` or a backtick, or where the next
/// `scheme://` begins.
///
/// ```
/// use flow_core::redact::redact_text;
///
/// assert_eq!(
///     redact_text("nodes redis://:pw@a:1,redis://:pw@b:2 are down"),
///     "nodes redis://:***@a:1,redis://:***@b:2 are down"
/// );
/// assert_eq!(redact_text("host=db password=pw user=app"), "host=db password=*** user=app");
/// assert_eq!(redact_text("nothing to hide"), "nothing to hide");
/// ```
pub fn redact_text(text: &str) -> Cow<'_, str> {
    redact_text_with(text, &mut |_| {})
}

fn redact_text_with<'a>(text: &'a str, found: &mut dyn FnMut(&str)) -> Cow<'a, str> {
    let structured = if text.contains("://") {
        let mut out = String::with_capacity(text.len() + MASK.len());
        let mut pos = 0;
        while let Some(i) = text[pos..].find("://") {
            let sep = pos + i;
            let start = scheme_start(text, pos, sep);
            let after = sep + 3;
            let mut end = text[after..]
                .find(is_text_stop)
                .map_or(text.len(), |j| after + j);
            if let Some(j) = text[after..end].find("://") {
                end = scheme_start(text, after, after + j);
            }
            out.push_str(&text[pos..start]);
            redact_structure(&text[start..end], &mut out, found);
            pos = end;
        }
        out.push_str(&text[pos..]);
        if out == text {
            Cow::Borrowed(text)
        } else {
            Cow::Owned(out)
        }
    } else {
        Cow::Borrowed(text)
    };
    match structured {
        Cow::Borrowed(t) => mask_params(t, Mode::Text, found),
        Cow::Owned(t) => Cow::Owned(mask_params(&t, Mode::Text, found).into_owned()),
    }
}

/// The one percent-decoder of the workspace: `%XX` escapes decoded, malformed escapes
/// kept as they are, invalid UTF-8 replaced by U+FFFD.
///
/// ```
/// use flow_core::redact::percent_decode;
/// assert_eq!(percent_decode("p%40ss%2Fword"), "p@ss/word");
/// assert_eq!(percent_decode("100%"), "100%");
/// ```
pub fn percent_decode(s: &str) -> Cow<'_, str> {
    percent_decode_str(s).decode_utf8_lossy()
}

/// Whether `key` names a secret (`password`, `sslpassword`, `ssl-key`, ...), by the
/// rules in the [module documentation](self).
///
/// ```
/// use flow_core::redact::is_secret_key;
/// assert!(is_secret_key("sslpassword"));
/// assert!(is_secret_key("SSL-KEY"));
/// assert!(!is_secret_key("sslmode"));
/// ```
pub fn is_secret_key(key: &str) -> bool {
    // The last 64 letters and digits, lower-cased: enough for every suffix below.
    let mut buf = [0u8; 64];
    let mut len = 0;
    for b in key.bytes().rev().filter(u8::is_ascii_alphanumeric) {
        if len == buf.len() {
            break;
        }
        buf[buf.len() - 1 - len] = b.to_ascii_lowercase();
        len += 1;
    }
    let k = &buf[buf.len() - len..];
    matches!(k, b"pass" | b"pwd" | b"sslkey")
        || [&b"password"[..], b"passwd", b"secret", b"token", b"apikey"]
            .iter()
            .any(|suffix| k.ends_with(suffix))
}

/// The secret values of some URLs (user-info passwords, non-numeric ports, values of
/// secret parameters), raw, percent-decoded and percent-encoded, for removing them from
/// text that may quote them outside a URL, such as a driver's error message.
///
/// Its `Debug` shows how many values it holds, never the values.
///
/// ```
/// use flow_core::redact::Secrets;
///
/// let secrets = Secrets::of_url("redis://:p%40ss@host:6379");
/// assert_eq!(secrets.scrub("AUTH failed for p@ss"), "AUTH failed for ***");
/// assert_eq!(format!("{secrets:?}"), "Secrets { values: 2 }");
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets {
    /// Longest first, so a secret is never left half-replaced by a shorter one.
    values: Vec<String>,
}

impl Secrets {
    /// No secrets.
    pub fn new() -> Self {
        Self::default()
    }

    /// The secrets of `url`.
    pub fn of_url(url: &str) -> Self {
        let mut secrets = Self::new();
        secrets.add_url(url);
        secrets
    }

    /// The secrets of every URL of `urls`.
    pub fn of_urls<I, S>(urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut secrets = Self::new();
        for url in urls {
            secrets.add_url(url.as_ref());
        }
        secrets
    }

    /// Adds the secrets of `url`.
    pub fn add_url(&mut self, url: &str) {
        let mut found = Vec::new();
        let mut collect = |s: &str| found.push(s.to_owned());
        // As one URL, and as text (which splits lists of URLs).
        let mut out = String::with_capacity(url.len());
        redact_structure(url, &mut out, &mut collect);
        let _ = mask_params(&out, Mode::Url, &mut collect);
        let _ = redact_text_with(url, &mut collect);
        for secret in found {
            self.add(&secret);
        }
    }

    /// Adds one secret value (as it appears in a URL): itself, percent-decoded (with `+`
    /// as a space, as in a query), and percent-encoded. Forms shorter than
    /// [`MIN_SCRUBBED_LEN`] characters are left out: replacing every `a` of a message
    /// would garble it, and inside URLs the URL rules mask them anyway.
    pub fn add(&mut self, secret: &str) {
        let decoded = percent_decode(secret).into_owned();
        let query_decoded = percent_decode(&secret.replace('+', " ")).into_owned();
        let encoded = utf8_percent_encode(&decoded, NON_ALPHANUMERIC).to_string();
        for value in [secret.to_owned(), decoded, query_decoded, encoded] {
            if value.chars().count() >= MIN_SCRUBBED_LEN
                && value != MASK
                && !self.values.contains(&value)
            {
                self.values.push(value);
            }
        }
        self.values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    }

    /// Whether there is nothing to remove.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// `text` through [`redact_text`], then with every occurrence of every secret value
    /// replaced by [`MASK`].
    pub fn scrub(&self, text: &str) -> String {
        let mut out = redact_text(text).into_owned();
        for value in &self.values {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), MASK);
            }
        }
        out
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secrets")
            .field("values", &self.values.len())
            .finish()
    }
}

/// An error message with its secrets masked, standing in for an error that may quote
/// them (a driver's error): its `Display` is the masked text of the original error and of
/// every error in its `source()` chain, its own chain repeats that, masked link by link.
///
/// ```
/// use flow_core::redact::{RedactedError, Secrets};
///
/// let driver = std::io::Error::other("cannot reach redis://:hunter2@db:6379");
/// let e = RedactedError::new(&driver, &Secrets::new());
/// assert_eq!(e.to_string(), "cannot reach redis://:***@db:6379");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct RedactedError {
    message: String,
    source: Option<Box<RedactedError>>,
}

impl RedactedError {
    /// The masked copy of `error` and its `source()` chain; `secrets` are removed too.
    pub fn new(error: &(dyn std::error::Error + 'static), secrets: &Secrets) -> Self {
        let source = error.source().map(|s| Box::new(Self::new(s, secrets)));
        Self {
            message: secrets.scrub(&error.to_string()),
            source,
        }
    }

    /// An error with `message` (masked by [`redact_text`] and `secrets`) and no source.
    pub fn from_message(message: &str, secrets: &Secrets) -> Self {
        Self {
            message: secrets.scrub(message),
            source: None,
        }
    }

    /// The masked message of this link of the chain.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for RedactedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for RedactedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("RedactedError");
        d.field("message", &self.message);
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl std::error::Error for RedactedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Where a URL inside text ends.
fn is_text_stop(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`')
}

/// Where the scheme before the `://` at `sep` starts (not before `floor`).
fn scheme_start(text: &str, floor: usize, sep: usize) -> usize {
    let bytes = text.as_bytes();
    let mut start = sep;
    while start > floor
        && matches!(bytes[start - 1], b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'+' | b'-' | b'.')
    {
        start -= 1;
    }
    start
}

/// Appends `url` to `out` with the user-info password and non-numeric ports masked;
/// reports each masked value to `found`. Query parameters are left to [`mask_params`].
fn redact_structure(url: &str, out: &mut String, found: &mut dyn FnMut(&str)) {
    let (head, mut rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    out.push_str(head);
    // The user info ends at the last '@': a password may hold unencoded '/', '?', '#'.
    if let Some(at) = rest.rfind('@') {
        let userinfo = &rest[..at];
        match userinfo.find(':') {
            Some(colon) => {
                out.push_str(&userinfo[..colon]);
                out.push(':');
                out.push_str(MASK);
                found(&userinfo[colon + 1..]);
            }
            None => out.push_str(userinfo),
        }
        out.push('@');
        rest = &rest[at + 1..];
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    for (i, host) in authority.split(',').enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_host(host, out, found);
    }
    out.push_str(tail);
}

/// Appends one `host[:port]`, masking a port that is not a number (punctuation of the
/// surrounding text after it aside).
fn push_host(host: &str, out: &mut String, found: &mut dyn FnMut(&str)) {
    let core = host.trim_end_matches(['.', ',', ';', ':', '!', ')', ']', '}']);
    // An IPv6 literal keeps its closing bracket.
    let core = if host.starts_with('[') && host[core.len()..].starts_with(']') {
        &host[..=core.len()]
    } else {
        core
    };
    // The port colon: after the closing bracket of an IPv6 literal, else the last one.
    let colon = match core.rfind(']') {
        Some(bracket) => core[bracket..].find(':').map(|c| bracket + c),
        None => core.rfind(':'),
    };
    if let Some(colon) = colon {
        let port = &core[colon + 1..];
        if !port.is_empty() && !port.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&core[..=colon]);
            out.push_str(MASK);
            out.push_str(&host[core.len()..]);
            found(port);
            return;
        }
    }
    out.push_str(host);
}

/// Whether [`mask_params`] works on one URL or on free text.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The whole input is one URL: a value runs to the next `&key=` or the end.
    Url,
    /// Free text: a value also ends at white space or a double quote.
    Text,
}

fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'[' | b']' | b'%')
}

/// Masks the value of every `key=value` pair with a secret key; reports each value.
fn mask_params<'a>(text: &'a str, mode: Mode, found: &mut dyn FnMut(&str)) -> Cow<'a, str> {
    let bytes = text.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    while let Some(eq) = text[i..].find('=').map(|j| i + j) {
        let mut key_start = eq;
        while key_start > 0 && is_key_byte(bytes[key_start - 1]) {
            key_start -= 1;
        }
        let key = &text[key_start..eq];
        // Drivers decode the key (`pass%77ord` is `password` to them): so does this.
        let secret = if key.contains('%') {
            is_secret_key(&percent_decode(key))
        } else {
            is_secret_key(key)
        };
        if key.is_empty() || !secret {
            i = eq + 1;
            continue;
        }
        let value_start = eq + 1;
        let value_end = value_end(text, value_start, mode);
        let value = &text[value_start..value_end];
        if value
            .strip_prefix(MASK)
            .is_some_and(|rest| rest.chars().all(|c| ".,;:!)]}".contains(c)))
        {
            // Masked already (text that went through here before): keep the punctuation.
            i = value_end.max(eq + 1);
            continue;
        }
        if value_end > value_start {
            let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
            o.push_str(&text[copied..value_start]);
            o.push_str(MASK);
            let value = &text[value_start..value_end];
            found(
                value
                    .strip_prefix('\'')
                    .map_or(value, |v| v.strip_suffix('\'').unwrap_or(v)),
            );
            copied = value_end;
        }
        i = value_end.max(eq + 1);
    }
    match out {
        Some(mut o) => {
            o.push_str(&text[copied..]);
            Cow::Owned(o)
        }
        None => Cow::Borrowed(text),
    }
}

/// Where the value starting at `start` ends.
///
/// A value may be quoted: `'...'` (libpq), and in text also `"..."` (a field printed
/// with `?`) or `\"...\"` (a quoted value inside a JSON string). A quoted value ends at
/// its closing quote; an unclosed one ends at the end of the line or of the JSON string
/// around it, never past a newline. An unquoted value in text ends at white space, a
/// `"`, or a `\` that starts a JSON escape, so it never eats the rest of a log line.
fn value_end(text: &str, start: usize, mode: Mode) -> usize {
    let bytes = text.as_bytes();
    let text_mode = mode == Mode::Text;
    let quoted = |open_len: usize, close: &[u8]| -> usize {
        let mut j = start + open_len;
        while j < bytes.len() {
            if bytes[j..].starts_with(close) {
                return j + close.len();
            }
            match bytes[j] {
                b'\n' | b'\r' => return j,
                // The end of the JSON string around the value.
                b'"' if text_mode => return j,
                // An escape: `\'` in a libpq value, `\\` in JSON.
                b'\\' if close != b"\\\"" || bytes.get(j + 1) != Some(&b'"') => j += 2,
                _ => j += 1,
            }
        }
        bytes.len()
    };
    match bytes.get(start) {
        Some(b'\'') => return quoted(1, b"'").min(bytes.len()),
        // A `"` followed by `:` closes a JSON key that ends in `=`: no value here.
        Some(b'"') if text_mode && bytes.get(start + 1) != Some(&b':') => {
            let mut j = start + 1;
            while j < bytes.len() {
                match bytes[j] {
                    b'"' => return j + 1,
                    b'\n' | b'\r' => return j,
                    b'\\' => j += 2,
                    _ => j += 1,
                }
            }
            return bytes.len();
        }
        Some(b'\\') if text_mode && bytes.get(start + 1) == Some(&b'"') => {
            return quoted(2, b"\\\"").min(bytes.len());
        }
        _ => {}
    }
    let mut j = start;
    while j < bytes.len() {
        let b = bytes[j];
        if text_mode
            && (b.is_ascii_whitespace()
                || b == b'"'
                || (b == b'\\' && matches!(bytes.get(j + 1), Some(b'"' | b'n' | b'r' | b't'))))
        {
            return j;
        }
        if b == b'&' && starts_pair(&bytes[j + 1..]) {
            return j;
        }
        j += 1;
    }
    bytes.len()
}

/// Whether `rest` starts with `key=`.
fn starts_pair(rest: &[u8]) -> bool {
    let key_len = rest.iter().take_while(|b| is_key_byte(**b)).count();
    key_len > 0 && rest.get(key_len) == Some(&b'=')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one table of cases every crate relies on: an input, what [`redact_url`] makes
    /// of it, and the secret values in it. No piece of a secret (cut at the reserved
    /// characters) may survive `redact_url`, nor `redact_text` of a line quoting a URL;
    /// [`Secrets::of_url`] must find every secret of a URL.
    const CASES: &[(&str, &str, &[&str])] = &[
        // User info.
        (
            "redis://:s3cret@cache:6379/0",
            "redis://:***@cache:6379/0",
            &["s3cret"],
        ),
        (
            "redis://user:pa:ss@h:1/2?x=y",
            "redis://user:***@h:1/2?x=y",
            &["pa:ss"],
        ),
        (
            "postgres://u:p%40ss@h/db",
            "postgres://u:***@h/db",
            &["p%40ss", "p@ss"],
        ),
        ("postgres://u@h/db", "postgres://u@h/db", &[]),
        ("redis://host:6379", "redis://host:6379", &[]),
        ("rediss://h:6380", "rediss://h:6380", &[]),
        ("memory://", "memory://", &[]),
        ("postgres://u:a@b@h/d", "postgres://u:***@h/d", &["a@b"]),
        (
            "postgres://app:s3cret@[::1]:5432/jobs",
            "postgres://app:***@[::1]:5432/jobs",
            &["s3cret"],
        ),
        // Unencoded reserved characters in the password.
        ("redis://:abc/def@host", "redis://:***@host", &["abc/def"]),
        (
            "redis://:abc/def@host:6379/0",
            "redis://:***@host:6379/0",
            &["abc/def"],
        ),
        (
            "postgres://u:xx?yy#zz@db:5432/jobs",
            "postgres://u:***@db:5432/jobs",
            &["xx?yy#zz"],
        ),
        (
            "postgres://u:aa/bb@cc/dd@db/jobs",
            "postgres://u:***@db/jobs",
            &["aa/bb@cc/dd"],
        ),
        // Query parameters.
        (
            "postgres://db/jobs?user=app&password=s3cret",
            "postgres://db/jobs?user=app&password=***",
            &["s3cret"],
        ),
        (
            "postgresql://u:pw1@h/d?PASSWORD=x1y2&sslmode=require",
            "postgresql://u:***@h/d?PASSWORD=***&sslmode=require",
            &["pw1", "x1y2"],
        ),
        (
            "postgres://app@db/jobs?sslmode=verify-full&sslpassword=k3y-pass&sslcert=/c.pem",
            "postgres://app@db/jobs?sslmode=verify-full&sslpassword=***&sslcert=/c.pem",
            &["k3y-pass"],
        ),
        (
            "postgres://app@db/jobs?sslkey=/etc/keys/client.key&sslmode=require",
            "postgres://app@db/jobs?sslkey=***&sslmode=require",
            &["/etc/keys/client.key"],
        ),
        (
            "postgres://app@db/jobs?ssl-key=/k.pem",
            "postgres://app@db/jobs?ssl-key=***",
            &["/k.pem"],
        ),
        (
            "postgres://db/jobs?password=abc&def&sslmode=require",
            "postgres://db/jobs?password=***&sslmode=require",
            &["abc&def"],
        ),
        (
            "postgres://db/jobs?password=a+b%2Fc",
            "postgres://db/jobs?password=***",
            &["a+b%2Fc", "a b/c"],
        ),
        (
            "redis+unix:///run/redis.sock?db=1&pass=s3cret",
            "redis+unix:///run/redis.sock?db=1&pass=***",
            &["s3cret"],
        ),
        (
            "postgres://db/jobs?sslmode=require&application_name=w1",
            "postgres://db/jobs?sslmode=require&application_name=w1",
            &[],
        ),
        // Unparsable URLs.
        ("redis://:s3cret", "redis://:***", &["s3cret"]),
        ("redis://host:s3cret/0", "redis://host:***/0", &["s3cret"]),
        ("user:s3cret@host:5432", "user:***@host:5432", &["s3cret"]),
        ("redis:/:s3cret@host", "redis:***@host", &["s3cret"]),
        ("not a url", "not a url", &[]),
        ("not a url with @ sign", "not a url with @ sign", &[]),
        ("", "", &[]),
        // Cluster URL lists.
        (
            "redis+cluster://:pw12@a:1,b:2/0",
            "redis+cluster://:***@a:1,b:2/0",
            &["pw12"],
        ),
        (
            "rediss+cluster://app:pw12@a:1, b:2",
            "rediss+cluster://app:***@a:1, b:2",
            &["pw12"],
        ),
        (
            "redis://:pw12@a:1,redis://:pw34@b:2",
            "redis://:***@b:2",
            &["pw12", "pw34"],
        ),
    ];

    /// The pieces of `secret` between reserved characters, three characters or longer.
    fn pieces(secret: &str) -> Vec<&str> {
        let mut out = vec![secret];
        out.extend(
            secret
                .split(['/', '?', '#', '@', '&', ':', '+', '%'])
                .filter(|p| p.len() >= 3),
        );
        out
    }

    #[test]
    fn quoted_and_encoded_secrets_in_text_are_masked_without_eating_the_line() {
        for (input, want) in [
            ("password=\"s3cret\" user=app", "password=*** user=app"),
            (
                r#"{"message":"conn password=\"s3cret\" ok","queue":"q"}"#,
                r#"{"message":"conn password=*** ok","queue":"q"}"#,
            ),
            (
                "{\"message\":\"user's api_key='k1 was rejected\",\"queue\":\"q\"}\nnext line",
                "{\"message\":\"user's api_key=***\",\"queue\":\"q\"}\nnext line",
            ),
            ("token=abc\\nrest", "token=***\\nrest"),
            (
                "postgres://app@db/jobs?pass%77ord=s3cret&x=1",
                "postgres://app@db/jobs?pass%77ord=***&x=1",
            ),
        ] {
            assert_eq!(redact_text(input), want, "{input}");
        }
        assert_eq!(
            redact_url("postgres://app@db/jobs?pa%73sword=s3cret"),
            "postgres://app@db/jobs?pa%73sword=***"
        );
    }

    #[test]
    fn the_table() {
        for (input, want, secrets) in CASES {
            let shown = redact_url(input);
            assert_eq!(shown, *want, "redact_url({input:?})");
            for secret in *secrets {
                for piece in pieces(secret) {
                    assert!(!shown.contains(piece), "{piece:?} in {shown:?}");
                }
            }
            if !input.contains("://") {
                continue;
            }
            // A driver quoting a secret on its own.
            let found = Secrets::of_url(input);
            assert!(!format!("{found:?}").contains(MASK), "{found:?}");
            for secret in *secrets {
                let scrubbed = found.scrub(&format!("driver says {secret} was wrong"));
                assert!(
                    !scrubbed.contains(secret),
                    "{secret:?} of {input:?} not removed: {scrubbed}"
                );
            }
            // Inside a line of text, bare, quoted or in JSON.
            for line in [
                format!("cannot connect to {input}: refused"),
                format!("error=\"{input}\" retrying"),
                format!("{{\"url\":\"{input}\",\"n\":1}}"),
            ] {
                let shown = redact_text(&line);
                for secret in *secrets {
                    for piece in pieces(secret) {
                        assert!(!shown.contains(piece), "{piece:?} in {shown:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn text_keeps_everything_but_the_secrets() {
        assert_eq!(
            redact_text("failed: redis://user:pa:ss@h:1/0 and postgresql://u:p@db:5432/x"),
            "failed: redis://user:***@h:1/0 and postgresql://u:***@db:5432/x"
        );
        assert_eq!(
            redact_text("nodes redis://:pw@a:1,redis://:pw@b:2 down"),
            "nodes redis://:***@a:1,redis://:***@b:2 down"
        );
        assert_eq!(
            redact_text("at redis://h:6379. Retrying"),
            "at redis://h:6379. Retrying"
        );
        assert_eq!(
            redact_text("host=db password=pw user=app"),
            "host=db password=*** user=app"
        );
        assert_eq!(
            redact_text("host=db password='a b\\' c' user=app"),
            "host=db password=*** user=app"
        );
        assert_eq!(
            redact_text("ignoring sslpassword=k3y and PASSWORD=abc"),
            "ignoring sslpassword=*** and PASSWORD=***"
        );
        assert_eq!(
            redact_text(r#"{"message":"x","password=":"","sslmode":"require"}"#),
            r#"{"message":"x","password=":"","sslmode":"require"}"#
        );
        assert_eq!(redact_text("x=1 y=2 tokens=3"), "x=1 y=2 tokens=3");
        // Text redacted twice reads the same.
        for once in [
            redact_url("redis://h:1/0?password=s3cret"),
            redact_text("at postgres://h/d?password=s3cret: refused").into_owned(),
        ] {
            let text = format!("error at {once}: refused");
            assert_eq!(redact_text(&text), text);
        }
        assert!(matches!(redact_text("plain text"), Cow::Borrowed(_)));
        assert!(matches!(
            redact_text("queue=q job_id=1 url=redis://h:1"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn secret_keys() {
        for key in [
            "password",
            "PASSWORD",
            "sslpassword",
            "ssl_password",
            "passwd",
            "pass",
            "pwd",
            "sslkey",
            "ssl-key",
            "client_secret",
            "access_token",
            "api-key",
        ] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in ["sslmode", "sslcert", "user", "passage", "tokens", "db", ""] {
            assert!(!is_secret_key(key), "{key}");
        }
    }

    #[test]
    fn secrets_cover_raw_decoded_and_encoded_forms() {
        let secrets = Secrets::of_url("redis://:p%40ss@host");
        assert_eq!(
            secrets.scrub("a p%40ss b p@ss c p%40ss"),
            "a *** b *** c ***"
        );
        let secrets = Secrets::of_url("postgres://h/d?password=a+b%2Fc");
        assert_eq!(secrets.scrub("x a b/c y"), "x *** y");
        assert!(Secrets::of_url("redis://h:1").is_empty());
        let both = Secrets::of_urls(["redis://:one1@a", "redis://:two2@b"]);
        assert_eq!(both.scrub("one1 two2"), "*** ***");
    }

    #[test]
    fn redacted_errors_mask_every_link() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("connect to postgres://u:s3cret@h/d failed")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(std::io::Error::other("said hunter2"));
        let r = RedactedError::new(&e, &Secrets::of_url("redis://:hunter2@x"));
        let mut chain = Vec::new();
        let mut link: Option<&(dyn std::error::Error + 'static)> = Some(&r);
        while let Some(l) = link {
            chain.push(l.to_string());
            link = l.source();
        }
        assert_eq!(
            chain,
            ["connect to postgres://u:***@h/d failed", "said ***"]
        );
        let debug = format!("{r:?}");
        assert!(
            !debug.contains("s3cret") && !debug.contains("hunter2"),
            "{debug}"
        );
    }
}
