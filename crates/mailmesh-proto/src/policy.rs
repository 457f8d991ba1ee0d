//! Inbound policies on the wire: an unspecified action is that field's default.

use mailmesh_types::{InboundPolicy, PolicyAction};

use crate::v1;

fn action(raw: i32, default: PolicyAction) -> PolicyAction {
    match v1::PolicyAction::try_from(raw) {
        Ok(v1::PolicyAction::Reject) => PolicyAction::Reject,
        Ok(v1::PolicyAction::Junk) => PolicyAction::Junk,
        Ok(v1::PolicyAction::Tag) => PolicyAction::Tag,
        _ => default,
    }
}

fn wire(a: PolicyAction) -> i32 {
    match a {
        PolicyAction::Reject => v1::PolicyAction::Reject,
        PolicyAction::Junk => v1::PolicyAction::Junk,
        PolicyAction::Tag => v1::PolicyAction::Tag,
    }
    .into()
}

impl From<v1::InboundPolicy> for InboundPolicy {
    fn from(p: v1::InboundPolicy) -> Self {
        let d = InboundPolicy::default();
        Self {
            dmarc_reject: action(p.dmarc_reject, d.dmarc_reject),
            dmarc_quarantine: action(p.dmarc_quarantine, d.dmarc_quarantine),
            block_listed: action(p.block_listed, d.block_listed),
        }
    }
}

impl From<InboundPolicy> for v1::InboundPolicy {
    fn from(p: InboundPolicy) -> Self {
        Self {
            dmarc_reject: wire(p.dmarc_reject),
            dmarc_quarantine: wire(p.dmarc_quarantine),
            block_listed: wire(p.block_listed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_round_trip_and_gaps_take_defaults() {
        let p = InboundPolicy {
            dmarc_reject: PolicyAction::Tag,
            dmarc_quarantine: PolicyAction::Reject,
            block_listed: PolicyAction::Junk,
        };
        assert_eq!(InboundPolicy::from(v1::InboundPolicy::from(p)), p);
        assert_eq!(
            InboundPolicy::from(v1::InboundPolicy::default()),
            InboundPolicy::default()
        );
    }
}
