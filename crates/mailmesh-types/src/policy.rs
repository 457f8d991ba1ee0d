//! What a tenant wants done with inbound mail that fails authentication checks.

use serde::{Deserialize, Serialize};

/// The treatment of one kind of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyAction {
    /// Refuse at SMTP time (`550 5.7.1`): the sender learns of it, nothing is stored.
    Reject,
    /// Accept and file in the recipient's Junk mailbox.
    Junk,
    /// Accept into INBOX; only the Authentication-Results header tells.
    Tag,
}

impl std::str::FromStr for PolicyAction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "reject" => Ok(Self::Reject),
            "junk" => Ok(Self::Junk),
            "tag" => Ok(Self::Tag),
            other => Err(format!("{other:?} is not one of reject, junk, tag")),
        }
    }
}

impl std::fmt::Display for PolicyAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Reject => "reject",
            Self::Junk => "junk",
            Self::Tag => "tag",
        })
    }
}

/// A tenant's inbound policy. The defaults honour what the author domain asks for
/// (DMARC `p=reject` rejected, `p=quarantine` filed as junk) and refuse clients
/// listed by the configured DNS block lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboundPolicy {
    /// Mail failing DMARC whose author domain publishes `p=reject`.
    pub dmarc_reject: PolicyAction,
    /// Mail failing DMARC whose author domain publishes `p=quarantine`.
    pub dmarc_quarantine: PolicyAction,
    /// Mail from a client listed by a DNS block list (and no allow list).
    pub block_listed: PolicyAction,
}

impl Default for InboundPolicy {
    fn default() -> Self {
        Self {
            dmarc_reject: PolicyAction::Reject,
            dmarc_quarantine: PolicyAction::Junk,
            block_listed: PolicyAction::Reject,
        }
    }
}
