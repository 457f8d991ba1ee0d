//! The multi-tenant directory: tenants, the domains each owns, users, aliases and
//! catch-alls, and per-tenant limits.
//!
//! [`Directory::apply`] is the only way state changes; it is deterministic, so every
//! replica that applies the same commands in the same order holds the same directory.
//! Uniqueness rules (a domain has one owner, an address one target) are checked there,
//! in log order, which makes them race-free across replicas.

use std::collections::{BTreeMap, BTreeSet};

use mailmesh_types::{Domain, EmailAddress, InboundPolicy, TenantId};
use serde::{Deserialize, Serialize};

use crate::{Result, StorageError};

/// A user's stable identity; addresses may change, the id does not. Object keys use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UserId(pub uuid::Uuid);

impl UserId {
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7())
    }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.simple())
    }
}

/// Limits a tenant's users share. `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantLimits {
    pub max_users: Option<u32>,
    pub max_storage_bytes: Option<u64>,
    pub max_message_bytes: Option<u64>,
    /// Recipients per hour, all the tenant's users together (submission).
    pub send_rate_per_hour: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: TenantId,
    pub limits: TenantLimits,
    /// Absent from snapshots written before policies existed.
    #[serde(default)]
    pub inbound: InboundPolicy,
    /// Submission leaves the sender's client address and name out of the Received
    /// header of this tenant's outgoing mail.
    #[serde(default)]
    pub hide_client: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: UserId,
    pub tenant: TenantId,
    pub address: EmailAddress,
    /// Argon2id PHC string; the password itself is never stored or logged.
    pub password_hash: String,
    /// Bytes; `None` falls back to the tenant's limits only.
    pub quota_bytes: Option<u64>,
    pub enabled: bool,
}

/// A DKIM signing key of a domain (RFC 6376, RFC 8463). The newest key of a domain
/// signs; older ones stay listed until removed, so their DNS records can be kept
/// until no message signed with them is still in flight.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DkimKey {
    pub domain: Domain,
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    /// PKCS#8 DER, base64.
    pub private_key: String,
    /// The `p=` value of the DNS record, base64.
    pub public_key: String,
    pub created_ms: i64,
}

impl std::fmt::Debug for DkimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DkimKey")
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm)
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

impl DkimKey {
    /// The TXT record to publish at `<selector>._domainkey.<domain>`.
    pub fn dns_record(&self) -> String {
        let k = match self.algorithm {
            DkimAlgorithm::Ed25519 => "ed25519",
            DkimAlgorithm::Rsa2048 => "rsa",
        };
        format!("v=DKIM1; k={k}; p={}", self.public_key)
    }

    pub fn dns_name(&self) -> String {
        format!("{}._domainkey.{}", self.selector, self.domain)
    }

    /// A new key pair; RSA keys take a moment (call off the async threads).
    pub fn generate(
        domain: Domain,
        selector: String,
        algorithm: DkimAlgorithm,
        created_ms: i64,
    ) -> Result<Self> {
        use base64::Engine as _;
        use rcgen::PublicKeyData as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let failed = |e: rcgen::Error| invalid(format!("generating a DKIM key: {e}"));
        let (pair, public) = match algorithm {
            DkimAlgorithm::Ed25519 => {
                let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(failed)?;
                // RFC 8463 3: the bare 32-byte key.
                let public = b64.encode(pair.public_key_raw());
                (pair, public)
            }
            DkimAlgorithm::Rsa2048 => {
                let pair = rcgen::KeyPair::generate_rsa_for(
                    &rcgen::PKCS_RSA_SHA256,
                    rcgen::RsaKeySize::_2048,
                )
                .map_err(failed)?;
                // RFC 6376 3.6.1: SubjectPublicKeyInfo, as OpenDKIM publishes it.
                let public = b64.encode(pair.subject_public_key_info());
                (pair, public)
            }
        };
        Ok(Self {
            domain,
            selector,
            algorithm,
            private_key: b64.encode(pair.serialized_der()),
            public_key: public,
            created_ms,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DkimAlgorithm {
    Ed25519,
    Rsa2048,
}

fn no_selector(domain: &Domain, selector: &str) -> StorageError {
    StorageError::NotFound(format!("DKIM selector {selector} of {domain}"))
}

/// A DKIM selector: a dot-separated list of DNS labels (RFC 6376 3.1).
pub fn valid_selector(selector: &str) -> bool {
    !selector.is_empty()
        && selector.len() <= 63
        && selector.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// What an address delivers to, besides users: other addresses (local or remote).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    pub address: EmailAddress,
    pub targets: Vec<EmailAddress>,
}

/// A directory change. Commands say what was asked; `apply` decides the outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum DirectoryCommand {
    AddTenant {
        tenant: TenantId,
        limits: TenantLimits,
    },
    SetTenantLimits {
        tenant: TenantId,
        limits: TenantLimits,
    },
    SetInboundPolicy {
        tenant: TenantId,
        policy: InboundPolicy,
    },
    SetHideClient {
        tenant: TenantId,
        hide_client: bool,
    },
    RemoveTenant {
        tenant: TenantId,
    },
    AddDomain {
        tenant: TenantId,
        domain: Domain,
    },
    /// Only the owner may remove a domain; checked in log order, so a domain that
    /// changed hands in between is never taken from its new owner.
    RemoveDomain {
        tenant: TenantId,
        domain: Domain,
    },
    AddUser {
        id: UserId,
        address: EmailAddress,
        password_hash: String,
        quota_bytes: Option<u64>,
    },
    SetPassword {
        address: EmailAddress,
        password_hash: String,
    },
    SetEnabled {
        address: EmailAddress,
        enabled: bool,
    },
    SetQuota {
        address: EmailAddress,
        quota_bytes: Option<u64>,
    },
    RemoveUser {
        address: EmailAddress,
    },
    AddAlias {
        address: EmailAddress,
        targets: Vec<EmailAddress>,
    },
    RemoveAlias {
        address: EmailAddress,
    },
    /// Mail to unknown local parts of `domain` goes to `target`; `None` removes it.
    SetCatchAll {
        domain: Domain,
        target: Option<EmailAddress>,
    },
    /// A new key for a local domain. It signs from now on when `activate` or when
    /// the domain has no other key; otherwise it waits (its DNS record must be
    /// published first) for `ActivateDkimKey`.
    AddDkimKey {
        key: DkimKey,
        #[serde(default)]
        activate: bool,
    },
    /// Makes a key the one that signs.
    ActivateDkimKey {
        domain: Domain,
        selector: String,
    },
    RemoveDkimKey {
        domain: Domain,
        selector: String,
    },
    /// The log belongs to this cluster (`crate::cluster`): set once, by the first
    /// start of a new cluster or by `mailctl cluster adopt`; another identity later
    /// is refused.
    Identify {
        cluster: uuid::Uuid,
    },
}

/// What a successful command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirectoryOutcome {
    Done,
    UserAdded(UserId),
    UserRemoved(UserId),
}

/// The lookup key of an address: domain, and local part without case (RFC 5321 says
/// local parts are case-sensitive, but every mail system an operator knows folds them).
type AddressKey = (Domain, String);

fn key(address: &EmailAddress) -> AddressKey {
    (
        address.domain().clone(),
        address.local_part().to_lowercase(),
    )
}

/// How many alias hops a lookup follows before it calls the chain a loop.
const MAX_ALIAS_DEPTH: usize = 8;
/// Most final recipients one address may expand to.
const MAX_EXPANSION: usize = 1000;

/// Where mail for an address goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The tenant that owns the address's domain (queue records carry it).
    pub tenant: TenantId,
    /// That tenant's inbound policy.
    pub inbound: InboundPolicy,
    /// Local mailboxes, each once.
    pub users: Vec<(TenantId, UserId)>,
    /// Those of `users` that have a quota (a front door may ask whether it is full).
    pub with_quota: Vec<UserId>,
    /// Addresses outside every local domain (aliases may forward there).
    pub remote: Vec<EmailAddress>,
    /// The smallest `max_message_bytes` of the tenants the mail goes to (the
    /// domain's and the local users'), if any has one: a front door refuses a
    /// larger message before it answers `250`, so it never bounces it later.
    pub max_message_bytes: Option<u64>,
}

/// Answer to "is this recipient acceptable?"
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The domain is not local: relaying is not allowed for this recipient.
    NotLocal,
    /// The domain is local but nobody receives mail at this address.
    Unknown,
    Deliver(Resolution),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Snapshot", into = "Snapshot")]
pub struct Directory {
    tenants: BTreeMap<TenantId, Tenant>,
    domains: BTreeMap<Domain, TenantId>,
    users: BTreeMap<UserId, User>,
    user_by_address: BTreeMap<AddressKey, UserId>,
    aliases: BTreeMap<AddressKey, Alias>,
    catch_all: BTreeMap<Domain, EmailAddress>,
    /// Signing keys per domain, oldest first (the last one signs).
    dkim: BTreeMap<Domain, Vec<DkimKey>>,
    /// The separator of subaddresses (`user+tag@`), if any.
    recipient_delimiter: Option<char>,
    /// The cluster this log belongs to (`crate::cluster`).
    cluster: Option<uuid::Uuid>,
}

fn default_delimiter() -> Option<char> {
    Some('+')
}

/// The directory as stored: entities only; lookup maps are rebuilt on load.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    tenants: Vec<Tenant>,
    domains: Vec<(Domain, TenantId)>,
    users: Vec<User>,
    aliases: Vec<Alias>,
    catch_all: Vec<(Domain, EmailAddress)>,
    recipient_delimiter: Option<char>,
    /// Absent from snapshots written before DKIM signing existed.
    #[serde(default)]
    dkim_keys: Vec<DkimKey>,
    /// Absent from snapshots written before the cluster identity existed.
    #[serde(default)]
    cluster: Option<uuid::Uuid>,
}

impl From<Directory> for Snapshot {
    fn from(d: Directory) -> Self {
        Self {
            tenants: d.tenants.into_values().collect(),
            domains: d.domains.into_iter().collect(),
            users: d.users.into_values().collect(),
            aliases: d.aliases.into_values().collect(),
            catch_all: d.catch_all.into_iter().collect(),
            recipient_delimiter: d.recipient_delimiter,
            dkim_keys: d.dkim.into_values().flatten().collect(),
            cluster: d.cluster,
        }
    }
}

impl From<Snapshot> for Directory {
    fn from(s: Snapshot) -> Self {
        Self {
            tenants: s.tenants.into_iter().map(|t| (t.id.clone(), t)).collect(),
            domains: s.domains.into_iter().collect(),
            user_by_address: s.users.iter().map(|u| (key(&u.address), u.id)).collect(),
            users: s.users.into_iter().map(|u| (u.id, u)).collect(),
            aliases: s
                .aliases
                .into_iter()
                .map(|a| (key(&a.address), a))
                .collect(),
            catch_all: s.catch_all.into_iter().collect(),
            recipient_delimiter: s.recipient_delimiter,
            dkim: s.dkim_keys.into_iter().fold(BTreeMap::new(), |mut m, k| {
                m.entry(k.domain.clone()).or_insert_with(Vec::new).push(k);
                m
            }),
            cluster: s.cluster,
        }
    }
}

fn invalid(msg: impl Into<String>) -> StorageError {
    StorageError::InvalidArgument(msg.into())
}

impl Default for Directory {
    /// An empty directory; `user+tag@` reaches `user@`.
    fn default() -> Self {
        Self {
            tenants: BTreeMap::new(),
            domains: BTreeMap::new(),
            users: BTreeMap::new(),
            user_by_address: BTreeMap::new(),
            aliases: BTreeMap::new(),
            catch_all: BTreeMap::new(),
            dkim: BTreeMap::new(),
            recipient_delimiter: default_delimiter(),
            cluster: None,
        }
    }
}

impl Directory {
    pub fn new() -> Self {
        Self::default()
    }

    /// The cluster this directory's log belongs to (`crate::cluster`).
    pub fn cluster(&self) -> Option<uuid::Uuid> {
        self.cluster
    }

    pub fn tenant(&self, id: &TenantId) -> Option<&Tenant> {
        self.tenants.get(id)
    }

    pub fn tenants(&self) -> impl Iterator<Item = &Tenant> {
        self.tenants.values()
    }

    pub fn domains_of<'a>(&'a self, tenant: &'a TenantId) -> impl Iterator<Item = &'a Domain> + 'a {
        self.domains
            .iter()
            .filter(move |(_, t)| *t == tenant)
            .map(|(d, _)| d)
    }

    pub fn domain_owner(&self, domain: &Domain) -> Option<&TenantId> {
        self.domains.get(domain)
    }

    /// Whether `selector` may be removed: not the signing key while another key
    /// would take over (a key waiting for activation may not be in DNS yet).
    pub fn check_dkim_removal(&self, domain: &Domain, selector: &str) -> Result<(), StorageError> {
        let keys = self.dkim_keys(domain);
        let at = keys
            .iter()
            .position(|k| k.selector == selector)
            .ok_or_else(|| no_selector(domain, selector))?;
        if at + 1 == keys.len() && keys.len() > 1 {
            return Err(invalid(format!(
                "{selector} is the key that signs for {domain}: activate another one \
                 first, or remove the others"
            )));
        }
        Ok(())
    }

    /// The domain's DKIM keys; the last one signs.
    pub fn dkim_keys(&self, domain: &Domain) -> &[DkimKey] {
        self.dkim.get(domain).map_or(&[], Vec::as_slice)
    }

    pub fn user(&self, id: &UserId) -> Option<&User> {
        self.users.get(id)
    }

    pub fn user_by_address(&self, address: &EmailAddress) -> Option<&User> {
        self.user_by_address
            .get(&key(address))
            .and_then(|id| self.users.get(id))
    }

    /// Every user of every tenant.
    pub fn all_users(&self) -> impl Iterator<Item = &User> {
        self.users.values()
    }

    pub fn users_of<'a>(&'a self, tenant: &'a TenantId) -> impl Iterator<Item = &'a User> + 'a {
        self.users.values().filter(move |u| &u.tenant == tenant)
    }

    pub fn aliases_of<'a>(&'a self, tenant: &'a TenantId) -> impl Iterator<Item = &'a Alias> + 'a {
        self.aliases
            .values()
            .filter(move |a| self.domains.get(a.address.domain()) == Some(tenant))
    }

    fn owner_of(&self, address: &EmailAddress) -> Result<TenantId> {
        self.domains.get(address.domain()).cloned().ok_or_else(|| {
            StorageError::NotFound(format!(
                "domain {} is not local (add it to a tenant first: mailctl domain add TENANT DOMAIN)",
                address.domain()
            ))
        })
    }

    fn existing_user(&self, address: &EmailAddress) -> Result<UserId> {
        self.user_by_address
            .get(&key(address))
            .copied()
            .ok_or_else(|| StorageError::NotFound(format!("user {address}")))
    }

    /// Applies one command. On error nothing changed.
    pub fn apply(&mut self, command: DirectoryCommand) -> Result<DirectoryOutcome> {
        use DirectoryCommand as C;
        match command {
            C::AddTenant { tenant, limits } => {
                if self.tenants.contains_key(&tenant) {
                    return Err(StorageError::AlreadyExists(format!("tenant {tenant}")));
                }
                self.tenants.insert(
                    tenant.clone(),
                    Tenant {
                        id: tenant,
                        limits,
                        inbound: InboundPolicy::default(),
                        hide_client: false,
                    },
                );
            }
            C::SetTenantLimits { tenant, limits } => {
                let t = self
                    .tenants
                    .get_mut(&tenant)
                    .ok_or_else(|| StorageError::NotFound(format!("tenant {tenant}")))?;
                t.limits = limits;
            }
            C::SetInboundPolicy { tenant, policy } => {
                let t = self
                    .tenants
                    .get_mut(&tenant)
                    .ok_or_else(|| StorageError::NotFound(format!("tenant {tenant}")))?;
                t.inbound = policy;
            }
            C::SetHideClient {
                tenant,
                hide_client,
            } => {
                let t = self
                    .tenants
                    .get_mut(&tenant)
                    .ok_or_else(|| StorageError::NotFound(format!("tenant {tenant}")))?;
                t.hide_client = hide_client;
            }
            C::RemoveTenant { tenant } => {
                if !self.tenants.contains_key(&tenant) {
                    return Err(StorageError::NotFound(format!("tenant {tenant}")));
                }
                if self.domains.values().any(|t| *t == tenant) {
                    return Err(StorageError::FailedPrecondition(format!(
                        "tenant {tenant} still owns domains; remove them first"
                    )));
                }
                self.tenants.remove(&tenant);
            }
            C::AddDomain { tenant, domain } => {
                if !self.tenants.contains_key(&tenant) {
                    return Err(StorageError::NotFound(format!("tenant {tenant}")));
                }
                match self.domains.get(&domain) {
                    Some(owner) if *owner == tenant => {
                        return Err(StorageError::AlreadyExists(format!("domain {domain}")));
                    }
                    // Never say which tenant: that would leak another tenant's data.
                    Some(_) => {
                        return Err(StorageError::FailedPrecondition(format!(
                            "domain {domain} belongs to another tenant"
                        )));
                    }
                    None => {}
                }
                self.domains.insert(domain, tenant);
            }
            C::RemoveDomain { tenant, domain } => {
                if self.domains.get(&domain) != Some(&tenant) {
                    // Says nothing about who else may own it.
                    return Err(StorageError::NotFound(format!(
                        "domain {domain} is not a domain of tenant {tenant}"
                    )));
                }
                let in_use = self.user_by_address.keys().any(|(d, _)| *d == domain)
                    || self.aliases.keys().any(|(d, _)| *d == domain);
                if in_use {
                    return Err(StorageError::FailedPrecondition(format!(
                        "domain {domain} still has users or aliases"
                    )));
                }
                self.domains.remove(&domain);
                self.catch_all.remove(&domain);
                self.dkim.remove(&domain);
            }
            C::AddUser {
                id,
                address,
                password_hash,
                quota_bytes,
            } => {
                let tenant = self.owner_of(&address)?;
                let k = key(&address);
                if self.user_by_address.contains_key(&k) || self.aliases.contains_key(&k) {
                    return Err(StorageError::AlreadyExists(format!("address {address}")));
                }
                if self.users.contains_key(&id) {
                    return Err(StorageError::AlreadyExists(format!("user id {id}")));
                }
                if let Some(max) = self.tenants.get(&tenant).and_then(|t| t.limits.max_users) {
                    let count = self.users.values().filter(|u| u.tenant == tenant).count();
                    if count >= max as usize {
                        return Err(StorageError::OverQuota {
                            reason: format!("tenant {tenant} has reached its limit of {max} users"),
                            permanent: true,
                        });
                    }
                }
                self.user_by_address.insert(k, id);
                self.users.insert(
                    id,
                    User {
                        id,
                        tenant,
                        address,
                        password_hash,
                        quota_bytes,
                        enabled: true,
                    },
                );
                return Ok(DirectoryOutcome::UserAdded(id));
            }
            C::SetPassword {
                address,
                password_hash,
            } => {
                let id = self.existing_user(&address)?;
                if let Some(u) = self.users.get_mut(&id) {
                    u.password_hash = password_hash;
                }
            }
            C::SetEnabled { address, enabled } => {
                let id = self.existing_user(&address)?;
                if let Some(u) = self.users.get_mut(&id) {
                    u.enabled = enabled;
                }
            }
            C::SetQuota {
                address,
                quota_bytes,
            } => {
                let id = self.existing_user(&address)?;
                if let Some(u) = self.users.get_mut(&id) {
                    u.quota_bytes = quota_bytes;
                }
            }
            C::RemoveUser { address } => {
                let id = self.existing_user(&address)?;
                self.user_by_address.remove(&key(&address));
                self.users.remove(&id);
                return Ok(DirectoryOutcome::UserRemoved(id));
            }
            C::AddAlias { address, targets } => {
                self.owner_of(&address)?;
                if targets.is_empty() || targets.len() > MAX_EXPANSION {
                    return Err(invalid(format!(
                        "an alias needs 1 to {MAX_EXPANSION} targets"
                    )));
                }
                let k = key(&address);
                if self.user_by_address.contains_key(&k) || self.aliases.contains_key(&k) {
                    return Err(StorageError::AlreadyExists(format!("address {address}")));
                }
                self.aliases.insert(k, Alias { address, targets });
            }
            C::RemoveAlias { address } => {
                if self.aliases.remove(&key(&address)).is_none() {
                    return Err(StorageError::NotFound(format!("alias {address}")));
                }
            }
            C::SetCatchAll { domain, target } => {
                if !self.domains.contains_key(&domain) {
                    return Err(StorageError::NotFound(format!("domain {domain}")));
                }
                match target {
                    Some(t) => {
                        self.catch_all.insert(domain, t);
                    }
                    None => {
                        self.catch_all.remove(&domain);
                    }
                }
            }
            C::AddDkimKey { key, activate } => {
                if !self.domains.contains_key(&key.domain) {
                    return Err(StorageError::NotFound(format!("domain {}", key.domain)));
                }
                if !valid_selector(&key.selector) {
                    return Err(invalid(format!("DKIM selector {:?}", key.selector)));
                }
                let keys = self.dkim.entry(key.domain.clone()).or_default();
                if keys.iter().any(|k| k.selector == key.selector) {
                    return Err(StorageError::AlreadyExists(format!(
                        "DKIM selector {} of {}",
                        key.selector, key.domain
                    )));
                }
                if activate || keys.is_empty() {
                    keys.push(key);
                } else {
                    // Before the signing key (the last): waiting to be activated.
                    let at = keys.len() - 1;
                    keys.insert(at, key);
                }
            }
            C::ActivateDkimKey { domain, selector } => {
                let keys = self
                    .dkim
                    .get_mut(&domain)
                    .ok_or_else(|| no_selector(&domain, &selector))?;
                let at = keys
                    .iter()
                    .position(|k| k.selector == selector)
                    .ok_or_else(|| no_selector(&domain, &selector))?;
                let key = keys.remove(at);
                keys.push(key);
            }
            // Applied as logged (older logs replay the same); the rule about the
            // signing key is checked before the command is written
            // (`check_dkim_removal`).
            C::RemoveDkimKey { domain, selector } => {
                let keys = self.dkim.entry(domain.clone()).or_default();
                let before = keys.len();
                keys.retain(|k| k.selector != selector);
                let removed = keys.len() < before;
                if keys.is_empty() {
                    self.dkim.remove(&domain);
                }
                if !removed {
                    return Err(no_selector(&domain, &selector));
                }
            }
            C::Identify { cluster } => match self.cluster {
                None => self.cluster = Some(cluster),
                Some(known) if known == cluster => {}
                Some(known) => {
                    return Err(StorageError::FailedPrecondition(format!(
                        "this log belongs to cluster {known}, not {cluster}"
                    )));
                }
            },
        }
        Ok(DirectoryOutcome::Done)
    }

    /// Who receives mail sent to `address`: users (after aliases, subaddresses and
    /// catch-alls) and remote forwarding targets. Disabled users still receive mail
    /// (disabling stops logins, not delivery); removed ones do not exist.
    pub fn lookup(&self, address: &EmailAddress) -> Lookup {
        let Some(owner) = self.domains.get(address.domain()) else {
            return Lookup::NotLocal;
        };
        let mut resolution = Resolution {
            tenant: owner.clone(),
            inbound: self
                .tenants
                .get(owner)
                .map(|t| t.inbound)
                .unwrap_or_default(),
            users: Vec::new(),
            with_quota: Vec::new(),
            remote: Vec::new(),
            max_message_bytes: None,
        };
        let mut seen = BTreeSet::new();
        if !self.expand(address, 0, &mut seen, &mut resolution) {
            return Lookup::Unknown;
        }
        if resolution.users.is_empty() && resolution.remote.is_empty() {
            return Lookup::Unknown;
        }
        resolution.max_message_bytes = std::iter::once(owner)
            .chain(resolution.users.iter().map(|(t, _)| t))
            .filter_map(|t| self.tenants.get(t)?.limits.max_message_bytes)
            .min();
        resolution.with_quota = resolution
            .users
            .iter()
            .filter(|(_, id)| self.users.get(id).is_some_and(|u| u.quota_bytes.is_some()))
            .map(|(_, id)| *id)
            .collect();
        Lookup::Deliver(resolution)
    }

    /// Adds what `address` delivers to; false when a local address has no target.
    fn expand(
        &self,
        address: &EmailAddress,
        depth: usize,
        seen: &mut BTreeSet<AddressKey>,
        out: &mut Resolution,
    ) -> bool {
        let k = key(address);
        if !seen.insert(k.clone()) || out.users.len() + out.remote.len() >= MAX_EXPANSION {
            // A loop or an over-long expansion: what was found so far stands.
            return true;
        }
        let Some(tenant) = self.domains.get(address.domain()) else {
            if !out.remote.contains(address) {
                out.remote.push(address.clone());
            }
            return true;
        };
        if let Some(id) = self.user_by_address.get(&k) {
            if !out.users.iter().any(|(_, u)| u == id) {
                out.users.push((tenant.clone(), *id));
            }
            return true;
        }
        if let Some(alias) = self.aliases.get(&k) {
            if depth >= MAX_ALIAS_DEPTH {
                return true;
            }
            let mut any = false;
            for target in &alias.targets {
                any |= self.expand(target, depth + 1, seen, out);
            }
            return any;
        }
        if let Some(base) = self.without_subaddress(address) {
            return self.expand(&base, depth + 1, seen, out);
        }
        if let Some(target) = self.catch_all.get(address.domain()) {
            if depth >= MAX_ALIAS_DEPTH {
                return true;
            }
            return self.expand(target, depth + 1, seen, out);
        }
        false
    }

    fn without_subaddress(&self, address: &EmailAddress) -> Option<EmailAddress> {
        let delimiter = self.recipient_delimiter?;
        let (base, _) = address.local_part().split_once(delimiter)?;
        if base.is_empty() {
            return None;
        }
        format!("{base}@{}", address.domain()).parse().ok()
    }
}

/// Hashes a password for storage (Argon2id, OWASP parameters, random salt). CPU-heavy
/// by design: call it off the async workers.
pub fn hash_password(password: &str) -> Result<String> {
    use argon2::PasswordHasher;
    if password.is_empty() || password.len() > 1024 {
        return Err(invalid("a password must be 1 to 1024 bytes"));
    }
    argon2::Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| invalid(format!("hashing the password: {e}")))
}

/// Checks a password against a stored hash (compared in constant time).
///
/// The Argon2 working memory (19 MiB with our parameters) is kept per thread and
/// reused: allocated per check, the allocator hands it back to the kernel and the next
/// check faults every page in again — a tenth of a login's CPU in `perf`
/// (`PERF=1 loadtest/imap-mixed.sh`). Password checks run on a few dedicated threads
/// (`passwords::PasswordPool`), so this costs those threads' worth of memory at most.
pub fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::password_hash::phc::Output;
    use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};
    /// Working memory beyond this (hashes made with other parameters) is not kept.
    const MAX_KEPT_BLOCKS: usize = 64 << 10; // 64 MiB
    thread_local! {
        static MEMORY: std::cell::RefCell<Vec<Block>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm.as_str()) else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    let blocks = params.block_count();
    let mut out = vec![0u8; expected.as_bytes().len()];
    let argon2 = Argon2::new(algorithm, version, params);
    let computed = if blocks <= MAX_KEPT_BLOCKS {
        MEMORY.with_borrow_mut(|memory| {
            if memory.len() < blocks {
                memory.resize(blocks, Block::default());
            }
            argon2.hash_password_into_with_memory(
                password.as_bytes(),
                salt,
                &mut out,
                &mut memory[..blocks],
            )
        })
    } else {
        argon2.hash_password_into(password.as_bytes(), salt, &mut out)
    };
    // `Output`'s equality is constant-time.
    computed.is_ok() && Output::new(&out).is_ok_and(|o| &o == expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TenantId {
        s.parse().unwrap()
    }
    fn d(s: &str) -> Domain {
        s.parse().unwrap()
    }
    fn a(s: &str) -> EmailAddress {
        s.parse().unwrap()
    }

    fn add_user(dir: &mut Directory, address: &str) -> UserId {
        match dir
            .apply(DirectoryCommand::AddUser {
                id: UserId::generate(),
                address: a(address),
                password_hash: "x".into(),
                quota_bytes: None,
            })
            .unwrap()
        {
            DirectoryOutcome::UserAdded(id) => id,
            other => panic!("{other:?}"),
        }
    }

    fn two_tenants() -> Directory {
        let mut dir = Directory::new();
        for (tenant, domain) in [("acme", "acme.test"), ("globex", "globex.test")] {
            dir.apply(DirectoryCommand::AddTenant {
                tenant: t(tenant),
                limits: TenantLimits::default(),
            })
            .unwrap();
            dir.apply(DirectoryCommand::AddDomain {
                tenant: t(tenant),
                domain: d(domain),
            })
            .unwrap();
        }
        dir
    }

    #[test]
    fn a_domain_has_one_owner_and_the_refusal_names_no_tenant() {
        let mut dir = two_tenants();
        let err = dir
            .apply(DirectoryCommand::AddDomain {
                tenant: t("globex"),
                domain: d("ACME.test"),
            })
            .unwrap_err();
        assert!(matches!(err, StorageError::FailedPrecondition(_)));
        assert!(!err.to_string().contains("acme\u{20}"), "{err}");
        assert!(!err.to_string().contains("tenant acme"), "{err}");
        assert_eq!(dir.domain_owner(&d("acme.test")), Some(&t("acme")));
    }

    #[test]
    fn dkim_keys_belong_to_local_domains_and_the_newest_signs() {
        let mut dir = two_tenants();
        let key = |domain: &str, selector: &str| {
            DkimKey::generate(d(domain), selector.into(), DkimAlgorithm::Ed25519, 1).unwrap()
        };
        let add = |dir: &mut Directory, k: DkimKey| {
            dir.apply(DirectoryCommand::AddDkimKey {
                key: k,
                activate: true,
            })
        };
        assert!(matches!(
            add(&mut dir, key("elsewhere.test", "s1")),
            Err(StorageError::NotFound(_))
        ));
        assert!(matches!(
            add(&mut dir, key("acme.test", "bad_selector")),
            Err(StorageError::InvalidArgument(_))
        ));
        add(&mut dir, key("acme.test", "s1")).unwrap();
        add(&mut dir, key("acme.test", "s2.rotated")).unwrap();
        assert!(matches!(
            add(&mut dir, key("acme.test", "s1")),
            Err(StorageError::AlreadyExists(_))
        ));
        let keys = dir.dkim_keys(&d("acme.test"));
        assert_eq!(keys.last().unwrap().selector, "s2.rotated");
        assert!(keys[0].dns_record().starts_with("v=DKIM1; k=ed25519; p="));
        assert_eq!(keys[0].dns_name(), "s1._domainkey.acme.test");
        // Snapshots keep them.
        let again: Directory = serde_json::from_str(&serde_json::to_string(&dir).unwrap()).unwrap();
        assert_eq!(again, dir);
        // The signing key cannot be removed while another key would take over.
        assert!(matches!(
            dir.check_dkim_removal(&d("acme.test"), "s2.rotated"),
            Err(StorageError::InvalidArgument(_))
        ));
        assert!(dir.check_dkim_removal(&d("acme.test"), "s1").is_ok());
        dir.apply(DirectoryCommand::ActivateDkimKey {
            domain: d("acme.test"),
            selector: "s1".into(),
        })
        .unwrap();
        dir.apply(DirectoryCommand::RemoveDkimKey {
            domain: d("acme.test"),
            selector: "s2.rotated".into(),
        })
        .unwrap();
        assert_eq!(
            dir.dkim_keys(&d("acme.test")).last().unwrap().selector,
            "s1"
        );
        // A rotation: the new key waits until it is activated.
        dir.apply(DirectoryCommand::AddDkimKey {
            key: key("acme.test", "s3"),
            activate: false,
        })
        .unwrap();
        assert_eq!(
            dir.dkim_keys(&d("acme.test")).last().unwrap().selector,
            "s1"
        );
        dir.apply(DirectoryCommand::ActivateDkimKey {
            domain: d("acme.test"),
            selector: "s3".into(),
        })
        .unwrap();
        assert_eq!(
            dir.dkim_keys(&d("acme.test")).last().unwrap().selector,
            "s3"
        );
        assert!(matches!(
            dir.apply(DirectoryCommand::RemoveDkimKey {
                domain: d("acme.test"),
                selector: "s2.rotated".into(),
            }),
            Err(StorageError::NotFound(_))
        ));
        // A snapshot from before DKIM existed still loads.
        let mut old: serde_json::Value = serde_json::to_value(&dir).unwrap();
        old.as_object_mut().unwrap().remove("dkim_keys");
        let old: Directory = serde_json::from_value(old).unwrap();
        assert!(old.dkim_keys(&d("acme.test")).is_empty());
    }

    #[test]
    fn a_default_directory_knows_subaddresses() {
        // Replicas start from `Default` when there is no snapshot yet.
        let mut dir = Directory::default();
        dir.apply(DirectoryCommand::AddTenant {
            tenant: t("acme"),
            limits: TenantLimits::default(),
        })
        .unwrap();
        dir.apply(DirectoryCommand::AddDomain {
            tenant: t("acme"),
            domain: d("acme.test"),
        })
        .unwrap();
        add_user(&mut dir, "alice@acme.test");
        assert!(matches!(
            dir.lookup(&a("alice+news@acme.test")),
            Lookup::Deliver(_)
        ));
    }

    #[test]
    fn a_domain_is_removed_only_by_its_owner() {
        let mut dir = two_tenants();
        assert!(matches!(
            dir.apply(DirectoryCommand::RemoveDomain {
                tenant: t("globex"),
                domain: d("acme.test"),
            }),
            Err(StorageError::NotFound(_))
        ));
        assert_eq!(dir.domain_owner(&d("acme.test")), Some(&t("acme")));
    }

    #[test]
    fn users_are_found_without_case_and_with_subaddresses() {
        let mut dir = two_tenants();
        let id = add_user(&mut dir, "Alice@acme.test");
        let expected = Lookup::Deliver(Resolution {
            tenant: t("acme"),
            inbound: InboundPolicy::default(),
            users: vec![(t("acme"), id)],
            with_quota: vec![],
            remote: vec![],
            max_message_bytes: None,
        });
        assert_eq!(dir.lookup(&a("alice@ACME.TEST")), expected);
        assert_eq!(dir.lookup(&a("ALICE+lists@acme.test")), expected);
        assert_eq!(dir.lookup(&a("bob@acme.test")), Lookup::Unknown);
        assert_eq!(dir.lookup(&a("alice@elsewhere.test")), Lookup::NotLocal);
        let err = dir
            .apply(DirectoryCommand::AddUser {
                id: UserId::generate(),
                address: a("ALICE@acme.test"),
                password_hash: "x".into(),
                quota_bytes: None,
            })
            .unwrap_err();
        assert!(matches!(err, StorageError::AlreadyExists(_)));
        assert!(matches!(
            dir.apply(DirectoryCommand::AddUser {
                id: UserId::generate(),
                address: a("carol@nowhere.test"),
                password_hash: "x".into(),
                quota_bytes: None,
            }),
            Err(StorageError::NotFound(_))
        ));
    }

    #[test]
    fn aliases_expand_once_and_stop_at_loops() {
        let mut dir = two_tenants();
        let alice = add_user(&mut dir, "alice@acme.test");
        let bob = add_user(&mut dir, "bob@acme.test");
        dir.apply(DirectoryCommand::AddAlias {
            address: a("team@acme.test"),
            targets: vec![
                a("alice@acme.test"),
                a("bob@acme.test"),
                a("ALICE@acme.test"),
                a("ext@remote.test"),
            ],
        })
        .unwrap();
        dir.apply(DirectoryCommand::AddAlias {
            address: a("loop1@acme.test"),
            targets: vec![a("loop2@acme.test"), a("alice@acme.test")],
        })
        .unwrap();
        dir.apply(DirectoryCommand::AddAlias {
            address: a("loop2@acme.test"),
            targets: vec![a("loop1@acme.test")],
        })
        .unwrap();
        assert_eq!(
            dir.lookup(&a("team@acme.test")),
            Lookup::Deliver(Resolution {
                tenant: t("acme"),
                inbound: InboundPolicy::default(),
                users: vec![(t("acme"), alice), (t("acme"), bob)],
                with_quota: vec![],
                remote: vec![a("ext@remote.test")],
                max_message_bytes: None,
            })
        );
        assert_eq!(
            dir.lookup(&a("loop2@acme.test")),
            Lookup::Deliver(Resolution {
                tenant: t("acme"),
                inbound: InboundPolicy::default(),
                users: vec![(t("acme"), alice)],
                with_quota: vec![],
                remote: vec![],
                max_message_bytes: None,
            })
        );
    }

    /// The smallest size limit of the tenants a recipient reaches, for the front
    /// doors to refuse a larger message before `250`.
    #[test]
    fn a_recipient_carries_the_smallest_size_limit_of_its_tenants() {
        let mut dir = two_tenants();
        let limit = |bytes: Option<u64>| TenantLimits {
            max_message_bytes: bytes,
            ..TenantLimits::default()
        };
        add_user(&mut dir, "alice@acme.test");
        add_user(&mut dir, "carol@globex.test");
        dir.apply(DirectoryCommand::AddAlias {
            address: a("team@acme.test"),
            targets: vec![a("alice@acme.test"), a("carol@globex.test")],
        })
        .unwrap();
        let max = |dir: &Directory, address: &str| match dir.lookup(&a(address)) {
            Lookup::Deliver(r) => r.max_message_bytes,
            other => panic!("{other:?}"),
        };
        assert_eq!(max(&dir, "team@acme.test"), None);
        for (tenant, bytes) in [("acme", 20_000), ("globex", 10_000)] {
            dir.apply(DirectoryCommand::SetTenantLimits {
                tenant: t(tenant),
                limits: limit(Some(bytes)),
            })
            .unwrap();
        }
        assert_eq!(max(&dir, "alice@acme.test"), Some(20_000));
        assert_eq!(max(&dir, "carol@globex.test"), Some(10_000));
        // An acme alias that reaches a globex user takes globex's limit too.
        assert_eq!(max(&dir, "team@acme.test"), Some(10_000));
    }

    #[test]
    fn catch_all_takes_unknown_local_parts() {
        let mut dir = two_tenants();
        let postmaster = add_user(&mut dir, "postmaster@acme.test");
        assert_eq!(dir.lookup(&a("random@acme.test")), Lookup::Unknown);
        dir.apply(DirectoryCommand::SetCatchAll {
            domain: d("acme.test"),
            target: Some(a("postmaster@acme.test")),
        })
        .unwrap();
        assert_eq!(
            dir.lookup(&a("random@acme.test")),
            Lookup::Deliver(Resolution {
                tenant: t("acme"),
                inbound: InboundPolicy::default(),
                users: vec![(t("acme"), postmaster)],
                with_quota: vec![],
                remote: vec![],
                max_message_bytes: None,
            })
        );
        // Another tenant's domain is untouched.
        assert_eq!(dir.lookup(&a("random@globex.test")), Lookup::Unknown);
    }

    #[test]
    fn removal_order_is_enforced() {
        let mut dir = two_tenants();
        add_user(&mut dir, "alice@acme.test");
        assert!(matches!(
            dir.apply(DirectoryCommand::RemoveTenant { tenant: t("acme") }),
            Err(StorageError::FailedPrecondition(_))
        ));
        assert!(matches!(
            dir.apply(DirectoryCommand::RemoveDomain {
                tenant: t("acme"),
                domain: d("acme.test")
            }),
            Err(StorageError::FailedPrecondition(_))
        ));
        dir.apply(DirectoryCommand::RemoveUser {
            address: a("alice@acme.test"),
        })
        .unwrap();
        dir.apply(DirectoryCommand::RemoveDomain {
            tenant: t("acme"),
            domain: d("acme.test"),
        })
        .unwrap();
        dir.apply(DirectoryCommand::RemoveTenant { tenant: t("acme") })
            .unwrap();
        assert!(dir.tenant(&t("acme")).is_none());
        assert_eq!(dir.lookup(&a("alice@acme.test")), Lookup::NotLocal);
    }

    #[test]
    fn a_tenants_inbound_policy_travels_with_its_lookups() {
        use mailmesh_types::PolicyAction;
        let mut dir = two_tenants();
        add_user(&mut dir, "alice@acme.test");
        let policy = InboundPolicy {
            dmarc_reject: PolicyAction::Junk,
            dmarc_quarantine: PolicyAction::Tag,
            block_listed: PolicyAction::Tag,
        };
        dir.apply(DirectoryCommand::SetInboundPolicy {
            tenant: t("acme"),
            policy,
        })
        .unwrap();
        let Lookup::Deliver(found) = dir.lookup(&a("alice@acme.test")) else {
            panic!("alice is local");
        };
        assert_eq!(found.inbound, policy);
        assert!(matches!(
            dir.apply(DirectoryCommand::SetInboundPolicy {
                tenant: t("nobody"),
                policy,
            }),
            Err(StorageError::NotFound(_))
        ));
        // Snapshots written before policies existed load with the default.
        let mut json = serde_json::to_value(&dir).unwrap();
        for tenant in json["tenants"].as_array_mut().unwrap() {
            let removed = tenant.as_object_mut().unwrap().remove("inbound");
            assert!(removed.is_some(), "the policy is in the snapshot");
        }
        let old: Directory = serde_json::from_value(json).unwrap();
        assert_eq!(
            old.tenant(&t("acme")).unwrap().inbound,
            InboundPolicy::default()
        );
    }

    #[test]
    fn tenant_user_limit() {
        let mut dir = two_tenants();
        dir.apply(DirectoryCommand::SetTenantLimits {
            tenant: t("acme"),
            limits: TenantLimits {
                max_users: Some(1),
                ..TenantLimits::default()
            },
        })
        .unwrap();
        add_user(&mut dir, "alice@acme.test");
        assert!(matches!(
            dir.apply(DirectoryCommand::AddUser {
                id: UserId::generate(),
                address: a("bob@acme.test"),
                password_hash: "x".into(),
                quota_bytes: None,
            }),
            Err(StorageError::OverQuota { .. })
        ));
        // The other tenant is not limited by it.
        add_user(&mut dir, "bob@globex.test");
    }

    #[test]
    fn replaying_the_same_commands_gives_the_same_directory() {
        let mut commands = vec![
            DirectoryCommand::AddTenant {
                tenant: t("acme"),
                limits: TenantLimits::default(),
            },
            DirectoryCommand::AddDomain {
                tenant: t("acme"),
                domain: d("acme.test"),
            },
        ];
        for i in 0..20 {
            commands.push(DirectoryCommand::AddUser {
                id: UserId::generate(),
                address: a(&format!("u{i}@acme.test")),
                password_hash: "x".into(),
                quota_bytes: Some(1000),
            });
        }
        let mut one = Directory::new();
        let mut two = Directory::new();
        for c in &commands {
            let r1 = one.apply(c.clone());
            let r2 = two.apply(c.clone());
            assert_eq!(r1, r2);
        }
        assert_eq!(one, two);
        // And through serialisation (commands travel as JSON in the log; snapshots too).
        let json = serde_json::to_string(&one).unwrap();
        assert_eq!(serde_json::from_str::<Directory>(&json).unwrap(), one);
    }

    #[test]
    fn passwords_hash_and_verify() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("wrong", &hash));
        assert!(!verify_password("correct horse", "not a hash"));
        // Hashes made elsewhere, with other parameters (Python's argon2-cffi): each
        // check sizes the reused working memory to its own parameters.
        for other in [
            "$argon2id$v=19$m=4096,t=3,p=2$e3T7khqUO7AV+qONGHvULA$axIrSFYtGq0MNTVvbjujBLTgnQZiTmI3kZrbRNtq/Tk",
            "$argon2i$v=19$m=8192,t=1,p=1$8IhAxIHZf0Xuf1lAz6N5Dg$+ZH248jFq/L3cTiuqgL80FcyAV9jHPNcW43p21IFMR0",
        ] {
            assert!(verify_password("correct horse", other), "{other}");
            assert!(!verify_password("correct horsf", other), "{other}");
            assert!(verify_password("correct horse", &hash));
        }
        // A hash cut short or with its output altered never matches.
        assert!(!verify_password("correct horse", &hash[..hash.len() - 4]));
        let mut altered = hash.clone();
        let last = altered.pop().unwrap();
        altered.push(if last == 'A' { 'B' } else { 'A' });
        assert!(!verify_password("correct horse", &altered));
        assert!(hash_password("").is_err());
    }
}
