//! What auth-check concludes, as its callers see it: plain values with no DNS or
//! crypto types in them, converted to and from the gRPC messages.

use mailmesh_proto::v1;

/// The result of one method, with RFC 8601's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthResult {
    #[default]
    None,
    Pass,
    Fail,
    SoftFail,
    Neutral,
    TempError,
    PermError,
}

impl AuthResult {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Pass => "pass",
            Self::Fail => "fail",
            Self::SoftFail => "softfail",
            Self::Neutral => "neutral",
            Self::TempError => "temperror",
            Self::PermError => "permerror",
        }
    }
}

/// The policy an author domain publishes for mail that fails DMARC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DmarcPolicy {
    #[default]
    None,
    Quarantine,
    Reject,
}

/// Facts about a client address, independent of any message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientVerdict {
    pub iprev: AuthResult,
    /// The verified host name when iprev passed.
    pub ptr: Option<String>,
    /// Block-list zones that list the address.
    pub block_listed: Vec<String>,
    /// Allow-list zones that list the address.
    pub allow_listed: Vec<String>,
}

impl ClientVerdict {
    /// The block list to cite when the address is listed and no allow list
    /// vouches for it.
    pub fn blocked_by(&self) -> Option<&str> {
        if self.allow_listed.is_empty() {
            self.block_listed.first().map(String::as_str)
        } else {
            None
        }
    }
}

/// Everything auth-check found about one message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageVerdict {
    pub client: ClientVerdict,
    /// SPF of the MAIL FROM identity (of HELO for the null sender).
    pub spf: AuthResult,
    /// SPF of the HELO identity, checked besides MAIL FROM when HELO is a domain.
    pub spf_helo: AuthResult,
    pub dkim: AuthResult,
    pub arc: AuthResult,
    pub dmarc: AuthResult,
    /// Meaningful when `dmarc` is `Fail`.
    pub dmarc_policy: DmarcPolicy,
    pub dmarc_domain: String,
    /// The whole `Authentication-Results` field, name included, ending in CRLF.
    pub authentication_results: String,
    /// The ARC set for forwarded copies (asked for, and a sealing key configured).
    pub arc_set: Option<String>,
}

impl MessageVerdict {
    /// The author domain's requested treatment when the message failed DMARC.
    pub fn dmarc_failure(&self) -> Option<DmarcPolicy> {
        (self.dmarc == AuthResult::Fail && self.dmarc_policy != DmarcPolicy::None)
            .then_some(self.dmarc_policy)
    }
}

impl From<AuthResult> for v1::AuthResult {
    fn from(r: AuthResult) -> Self {
        match r {
            AuthResult::None => Self::None,
            AuthResult::Pass => Self::Pass,
            AuthResult::Fail => Self::Fail,
            AuthResult::SoftFail => Self::Softfail,
            AuthResult::Neutral => Self::Neutral,
            AuthResult::TempError => Self::Temperror,
            AuthResult::PermError => Self::Permerror,
        }
    }
}

fn auth_result(raw: i32) -> AuthResult {
    match v1::AuthResult::try_from(raw) {
        Ok(v1::AuthResult::Pass) => AuthResult::Pass,
        Ok(v1::AuthResult::Fail) => AuthResult::Fail,
        Ok(v1::AuthResult::Softfail) => AuthResult::SoftFail,
        Ok(v1::AuthResult::Neutral) => AuthResult::Neutral,
        Ok(v1::AuthResult::Temperror) => AuthResult::TempError,
        Ok(v1::AuthResult::Permerror | v1::AuthResult::Policy) => AuthResult::PermError,
        _ => AuthResult::None,
    }
}

impl From<ClientVerdict> for v1::ClientVerdict {
    fn from(c: ClientVerdict) -> Self {
        Self {
            iprev: v1::AuthResult::from(c.iprev).into(),
            ptr: c.ptr.unwrap_or_default(),
            block_listed: c.block_listed,
            allow_listed: c.allow_listed,
        }
    }
}

impl From<v1::ClientVerdict> for ClientVerdict {
    fn from(c: v1::ClientVerdict) -> Self {
        Self {
            iprev: auth_result(c.iprev),
            ptr: (!c.ptr.is_empty()).then_some(c.ptr),
            block_listed: c.block_listed,
            allow_listed: c.allow_listed,
        }
    }
}

impl From<MessageVerdict> for v1::MessageVerdict {
    fn from(m: MessageVerdict) -> Self {
        Self {
            client: Some(m.client.into()),
            spf: v1::AuthResult::from(m.spf).into(),
            spf_helo: v1::AuthResult::from(m.spf_helo).into(),
            dkim: v1::AuthResult::from(m.dkim).into(),
            arc: v1::AuthResult::from(m.arc).into(),
            dmarc: v1::AuthResult::from(m.dmarc).into(),
            dmarc_policy: match m.dmarc_policy {
                DmarcPolicy::None => v1::DmarcPolicy::None,
                DmarcPolicy::Quarantine => v1::DmarcPolicy::Quarantine,
                DmarcPolicy::Reject => v1::DmarcPolicy::Reject,
            }
            .into(),
            dmarc_domain: m.dmarc_domain,
            authentication_results: m.authentication_results,
            arc_set: m.arc_set.unwrap_or_default(),
        }
    }
}

impl From<v1::MessageVerdict> for MessageVerdict {
    fn from(m: v1::MessageVerdict) -> Self {
        Self {
            client: m.client.map(Into::into).unwrap_or_default(),
            spf: auth_result(m.spf),
            spf_helo: auth_result(m.spf_helo),
            dkim: auth_result(m.dkim),
            arc: auth_result(m.arc),
            dmarc: auth_result(m.dmarc),
            dmarc_policy: match v1::DmarcPolicy::try_from(m.dmarc_policy) {
                Ok(v1::DmarcPolicy::Reject) => DmarcPolicy::Reject,
                Ok(v1::DmarcPolicy::Quarantine) => DmarcPolicy::Quarantine,
                _ => DmarcPolicy::None,
            },
            dmarc_domain: m.dmarc_domain,
            authentication_results: m.authentication_results,
            arc_set: (!m.arc_set.is_empty()).then_some(m.arc_set),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_survive_the_wire() {
        let verdict = MessageVerdict {
            client: ClientVerdict {
                iprev: AuthResult::Pass,
                ptr: Some("mx.example.test".into()),
                block_listed: vec!["bl.test".into()],
                allow_listed: vec![],
            },
            spf: AuthResult::SoftFail,
            spf_helo: AuthResult::Pass,
            dkim: AuthResult::Pass,
            arc: AuthResult::None,
            dmarc: AuthResult::Fail,
            dmarc_policy: DmarcPolicy::Quarantine,
            dmarc_domain: "example.test".into(),
            authentication_results: "Authentication-Results: mx; none\r\n".into(),
            arc_set: Some("ARC-Seal: i=1; cv=none\r\n".into()),
        };
        let back = MessageVerdict::from(v1::MessageVerdict::from(verdict.clone()));
        assert_eq!(back, verdict);
        assert_eq!(back.dmarc_failure(), Some(DmarcPolicy::Quarantine));
        assert_eq!(back.client.blocked_by(), Some("bl.test"));
    }

    #[test]
    fn an_allow_list_outweighs_a_block_list() {
        let c = ClientVerdict {
            block_listed: vec!["bl.test".into()],
            allow_listed: vec!["wl.test".into()],
            ..ClientVerdict::default()
        };
        assert_eq!(c.blocked_by(), None);
    }
}
