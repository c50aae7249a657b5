//! Keeping secrets out of messages: URLs with their passwords masked, and library errors with
//! any password they echoed removed. Every module that prints a URL goes through here.

use secrecy::{ExposeSecret, SecretString};

/// The URL with any password replaced by `***`, for messages. A comma-separated list of URLs
/// (several broker hosts) is redacted host by host.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|u| redact_one(u.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_one(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparsable URL>".to_string(),
    }
}

/// Removes a secret URL's passwords from a message, in case a library echoed one.
pub fn scrub(message: &str, url: &SecretString) -> String {
    let mut out = message.to_string();
    for u in url.expose_secret().split(',') {
        if let Ok(u) = url::Url::parse(u.trim()) {
            if let Some(p) = u.password().filter(|p| !p.is_empty()) {
                out = out.replace(p, "***");
                // A password may also appear percent-decoded.
                if let Ok(decoded) = urlencoding_decode(p) {
                    if !decoded.is_empty() {
                        out = out.replace(&decoded, "***");
                    }
                }
            }
        }
    }
    out
}

fn urlencoding_decode(s: &str) -> Result<String, std::string::FromUtf8Error> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_host_of_a_list_is_redacted() {
        let shown = redact_url("amqp://guest:secret1@a:5672/%2f,amqp://guest:secret2@b:5672/%2f");
        assert!(!shown.contains("secret1") && !shown.contains("secret2"), "{shown}");
        assert_eq!(shown.matches("***").count(), 2);
        let url = SecretString::from("amqp://u:p%40ss@a/,amqp://u:other@b/");
        assert_eq!(
            scrub("failed: p@ss and other and p%40ss", &url),
            "failed: *** and *** and ***"
        );
    }
}
