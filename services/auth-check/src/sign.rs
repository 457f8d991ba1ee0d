//! DKIM signing of outgoing mail (RFC 6376, RFC 8463 Ed25519) with `mail-auth`.

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner};

/// The headers signed when present (RFC 6376 5.4.1's list, plus MIME and list
/// headers); `From` is always signed.
const SIGNED: &[&str] = &[
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    Ed25519,
    Rsa,
}

#[derive(Debug, thiserror::Error)]
#[error("DKIM signing: {0}")]
pub struct SignError(String);

/// A `DKIM-Signature: ...\r\n` field for `message` (CRLF line ends), made with the
/// PKCS#8 key of `domain` under `selector`; relaxed/relaxed canonicalisation.
pub fn dkim_signature(
    algorithm: KeyAlgorithm,
    pkcs8: &[u8],
    domain: &str,
    selector: &str,
    message: &[u8],
) -> Result<String, SignError> {
    let e = |e: mail_auth::Error| SignError(e.to_string());
    let present = present_headers(message);
    let headers: Vec<String> = SIGNED
        .iter()
        .filter(|h| **h == "From" || present.iter().any(|p| p.eq_ignore_ascii_case(h)))
        .map(|h| (*h).to_owned())
        .collect();
    let signature = match algorithm {
        KeyAlgorithm::Ed25519 => sign_with(
            Ed25519Key::from_pkcs8_der(pkcs8).map_err(e)?,
            domain,
            selector,
            headers,
            message,
        ),
        KeyAlgorithm::Rsa => {
            let der = rustls_pki_types::PrivateKeyDer::Pkcs8(pkcs8.to_vec().into());
            sign_with(
                RsaKey::<Sha256>::from_key_der(der).map_err(e)?,
                domain,
                selector,
                headers,
                message,
            )
        }
    }
    .map_err(e)?;
    Ok(signature.to_header())
}

fn sign_with<K: SigningKey>(
    key: K,
    domain: &str,
    selector: &str,
    headers: Vec<String>,
    message: &[u8],
) -> mail_auth::Result<mail_auth::dkim::Signature> {
    DkimSigner::from_key(key)
        .domain(domain)
        .selector(selector)
        .headers(headers)
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed)
        .sign(message)
}

/// Names of the header fields in `message`.
fn present_headers(message: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    for line in message.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if matches!(line[0], b' ' | b'\t') {
            continue;
        }
        if let Some(colon) = line.iter().position(|b| *b == b':') {
            names.push(String::from_utf8_lossy(line[..colon].trim_ascii()).into_owned());
        }
    }
    names
}
