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
    let headers = signed_headers(message);
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

/// The fields of [`SIGNED`] that `message` has (From always, even when absent, as
/// RFC 6376 §5.4 requires), in that order, and `From` once more: named once more in
/// `h=` than the message has it, so a `From` added after signing breaks the
/// signature (over-signing, RFC 6376 §5.4.2, §8.15).
fn signed_headers(message: &[u8]) -> Vec<String> {
    let present = present_headers(message);
    let mut names: Vec<String> = SIGNED
        .iter()
        .filter(|h| **h == "From" || present.iter().any(|p| p.eq_ignore_ascii_case(h)))
        .map(|h| (*h).to_owned())
        .collect();
    // mail-auth signs every instance of a listed name and lists a name it did not
    // find as a null instance: a second "From" is that extra instance.
    names.push("From".to_owned());
    names
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

/// `[auth.arc_seal]`: the key mail forwarded to other domains is ARC-sealed with
/// (RFC 8617), so receivers can trust the results this deployment recorded
/// before the forward changed the envelope. Publish its public key as
/// `<selector>._domainkey.<domain> TXT "v=DKIM1; k=…; p=…"`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArcSealConfig {
    /// PKCS#8 PEM private key, RSA (2048 bits or more) or Ed25519
    /// (`openssl genpkey -algorithm ed25519`).
    pub key_file: std::path::PathBuf,
    pub domain: String,
    pub selector: String,
}

/// A loaded sealing key.
pub struct ArcSealKey {
    algorithm: KeyAlgorithm,
    pkcs8: Vec<u8>,
    domain: String,
    selector: String,
}

impl std::fmt::Debug for ArcSealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArcSealKey")
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .finish_non_exhaustive()
    }
}

impl ArcSealKey {
    pub fn load(config: &ArcSealConfig) -> Result<Self, SignError> {
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_file(&config.key_file)
            .map_err(|e| SignError(format!("{}: {e}", config.key_file.display())))?;
        let pkcs8 = der.secret_pkcs8_der().to_vec();
        let algorithm = if Ed25519Key::from_pkcs8_der(&pkcs8).is_ok() {
            KeyAlgorithm::Ed25519
        } else {
            let der = rustls_pki_types::PrivateKeyDer::Pkcs8(pkcs8.clone().into());
            RsaKey::<Sha256>::from_key_der(der).map_err(|e| {
                SignError(format!(
                    "{}: neither Ed25519 nor RSA: {e}",
                    config.key_file.display()
                ))
            })?;
            KeyAlgorithm::Rsa
        };
        Ok(Self {
            algorithm,
            pkcs8,
            domain: config.domain.clone(),
            selector: config.selector.clone(),
        })
    }

    /// The ARC set (three header fields, folded, CRLF) sealing `message` with the
    /// results this hop found (`results`) and the chain it verified (`arc`).
    pub fn seal(
        &self,
        message: &mail_auth::AuthenticatedMessage<'_>,
        raw: &[u8],
        results: &mail_auth::AuthenticationResults<'_>,
        arc: &mail_auth::ArcOutput<'_>,
    ) -> Result<String, SignError> {
        let e = |e: mail_auth::Error| SignError(e.to_string());
        let headers = signed_headers(raw);
        match self.algorithm {
            KeyAlgorithm::Ed25519 => self.seal_with(
                Ed25519Key::from_pkcs8_der(&self.pkcs8).map_err(e)?,
                headers,
                (message, results, arc),
            ),
            KeyAlgorithm::Rsa => {
                let der = rustls_pki_types::PrivateKeyDer::Pkcs8(self.pkcs8.clone().into());
                self.seal_with(
                    RsaKey::<Sha256>::from_key_der(der).map_err(e)?,
                    headers,
                    (message, results, arc),
                )
            }
        }
        .map_err(e)
    }

    fn seal_with<K: SigningKey<Hasher = Sha256>>(
        &self,
        key: K,
        headers: Vec<String>,
        (message, results, arc): (
            &mail_auth::AuthenticatedMessage<'_>,
            &mail_auth::AuthenticationResults<'_>,
            &mail_auth::ArcOutput<'_>,
        ),
    ) -> mail_auth::Result<String> {
        Ok(mail_auth::arc::ArcSealer::from_key(key)
            .domain(self.domain.as_str())
            .selector(self.selector.as_str())
            .headers(headers)
            .seal(message, results, arc)?
            .to_header())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `h=` names From once more than the message has it (that such a signature
    /// verifies is checked by dkimpy in mailctl's relay test).
    #[test]
    fn from_is_over_signed() {
        let key = mail_auth::common::crypto::Ed25519Key::generate_pkcs8().unwrap();
        let message = b"From: a@acme.test\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n";
        let field =
            dkim_signature(KeyAlgorithm::Ed25519, &key, "acme.test", "mm1", message).unwrap();
        let h = field
            .split(';')
            .find_map(|tag| tag.trim().strip_prefix("h="))
            .unwrap_or_else(|| panic!("no h= in {field}"));
        let names: Vec<String> = h
            .split(':')
            .map(|n| n.trim().to_ascii_lowercase())
            .collect();
        assert_eq!(names.iter().filter(|n| *n == "from").count(), 2, "{h}");
        assert!(names.contains(&"subject".to_owned()), "{h}");
    }
}
