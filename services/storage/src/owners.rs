//! Which replica applies which mailbox partition (ADR 0005 §1).
//!
//! The replicas are members of one consumer group over `<mailbox topic>.members`, a
//! topic with as many partitions as the mailbox log and no records: the group's
//! assignment of partition *p* there makes this replica the owner of mailbox
//! partition *p*. An owner opens its partitions (restore, replay), and announces
//! itself in `<mailbox topic>.owners`, a one-partition log every replica tails, so a
//! replica that is asked about a partition it does not own knows where to forward
//! the call. The announcements are hints: a call forwarded to a replica that no
//! longer owns the partition is refused with [`EngineError::NotOwner`] and routed
//! again once the map moves. Correctness never rests on them: every replica that
//! applies a partition applies its whole log in order, so two replicas that both
//! think they own it for a moment (a zombie) give the same outcomes, as in ADR 0001.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mailmesh_queue::{Assignment, Membership, OutgoingRecord, Queue};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::EngineError;

/// The topic whose partitions the group assigns (never written).
pub fn members_topic(mailbox_topic: &str) -> String {
    format!("{mailbox_topic}.members")
}

/// The log of owner announcements.
pub fn owners_topic(mailbox_topic: &str) -> String {
    format!("{mailbox_topic}.owners")
}

/// The consumer group of the partition owners.
pub fn owners_group(mailbox_topic: &str) -> String {
    format!("{mailbox_topic}.owners")
}

/// A replica that announced itself as a partition's owner.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    /// Random per process start.
    pub replica: String,
    /// `host:port` of its gRPC listener.
    pub addr: String,
}

/// One record of the owners log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Notice {
    Owner {
        partition: i32,
        #[serde(flatten)]
        owner: Owner,
    },
}

/// Where a call for a partition goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Here,
    There(Owner),
}

/// This replica's part in the partition owners' group.
pub struct Owners {
    queue: Arc<dyn Queue>,
    topic: String,
    me: String,
    /// Where other replicas reach this one; announcements wait for it.
    addr: watch::Sender<Option<String>>,
    assignment: watch::Receiver<Assignment>,
    /// The latest announcement per partition.
    map: watch::Sender<HashMap<i32, Owner>>,
    /// How long a call waits for an owner to appear before it is unavailable.
    patience: Duration,
    membership: std::sync::Mutex<Option<Membership>>,
    tail: tokio::task::JoinHandle<()>,
}

impl Drop for Owners {
    fn drop(&mut self) {
        self.tail.abort();
    }
}

impl Owners {
    /// Joins the owners' group of `mailbox_topic` (`partitions` partitions) and
    /// starts tailing the owners log.
    pub async fn join(
        queue: Arc<dyn Queue>,
        mailbox_topic: &str,
        partitions: i32,
        patience: Duration,
        session_timeout: Duration,
    ) -> Result<Arc<Self>, EngineError> {
        let members = members_topic(mailbox_topic);
        let topic = owners_topic(mailbox_topic);
        queue.ensure_topic(&members, partitions).await?;
        // Only the latest announcement per partition matters (key: the partition).
        queue
            .ensure_topic_with(&topic, 1, &[("cleanup.policy", "compact".to_owned())])
            .await?;
        if queue.partition_count(&members).await? != partitions {
            return Err(EngineError::Unavailable(format!(
                "{members} must have as many partitions as {mailbox_topic} ({partitions})"
            )));
        }
        let membership = queue
            .membership(&owners_group(mailbox_topic), &members, session_timeout)
            .await?;
        let reader = queue.reader(&topic, 0, 0).await?;
        let map = watch::channel(HashMap::new()).0;
        let owners = Arc::new_cyclic(|weak: &std::sync::Weak<Self>| Self {
            queue,
            topic,
            me: uuid::Uuid::new_v4().simple().to_string(),
            addr: watch::channel(None).0,
            assignment: membership.assignment.clone(),
            map,
            patience,
            membership: std::sync::Mutex::new(Some(membership)),
            tail: tokio::spawn(tail(weak.clone(), reader)),
        });
        Ok(owners)
    }

    /// Leaves the group now (at shutdown), so its partitions move at once rather
    /// than when the session times out.
    pub fn leave(&self) {
        self.membership
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    /// This replica's id in announcements.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Sets where other replicas reach this one (its gRPC listener).
    pub fn advertise(&self, addr: String) {
        self.addr.send_replace(Some(addr));
    }

    pub fn assignment(&self) -> watch::Receiver<Assignment> {
        self.assignment.clone()
    }

    pub fn advertised(&self) -> watch::Receiver<Option<String>> {
        self.addr.subscribe()
    }

    pub fn owns(&self, partition: i32) -> bool {
        self.assignment.borrow().partitions.contains(&partition)
    }

    /// Waits (at most the patience) until `partition` is this replica's, else
    /// `NotOwner` (for calls made on this replica's engine directly: tools, tests;
    /// routed calls go where [`Self::route`] says).
    pub async fn owned(&self, partition: i32) -> Result<(), EngineError> {
        // Every call on an owned partition comes here: no timer, no subscription.
        if self.owns(partition) {
            return Ok(());
        }
        let mut assignment = self.assignment.clone();
        let decided = tokio::time::timeout(
            self.patience,
            assignment.wait_for(|a| a.partitions.contains(&partition)),
        )
        .await;
        match decided {
            Ok(Ok(_)) => Ok(()),
            _ => Err(EngineError::NotOwner(partition)),
        }
    }

    /// Where a call for `partition` goes: here while this replica owns it, else to
    /// the announced owner, skipping `refused` (a replica that said it is not the
    /// owner, or could not be reached) until the map moves on. Waits at most the
    /// patience for an owner.
    pub async fn route(
        &self,
        partition: i32,
        refused: Option<&Owner>,
    ) -> Result<Route, EngineError> {
        if self.owns(partition) {
            return Ok(Route::Here);
        }
        let mut assignment = self.assignment.clone();
        let mut map = self.map.subscribe();
        let deadline = tokio::time::Instant::now() + self.patience;
        loop {
            if assignment
                .borrow_and_update()
                .partitions
                .contains(&partition)
            {
                return Ok(Route::Here);
            }
            if let Some(owner) = map.borrow_and_update().get(&partition)
                && owner.replica != self.me
                && Some(owner) != refused
            {
                return Ok(Route::There(owner.clone()));
            }
            let changed = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    r = assignment.changed() => r.is_ok(),
                    r = map.changed() => r.is_ok(),
                }
            })
            .await;
            if !matches!(changed, Ok(true)) {
                return Err(EngineError::Unavailable(format!(
                    "no replica serves mailbox partition {partition} (owners are moving)"
                )));
            }
        }
    }

    /// The other replicas that announced partitions, with the partitions each
    /// announced last.
    pub fn others(&self) -> HashMap<Owner, Vec<i32>> {
        let mut others: HashMap<Owner, Vec<i32>> = HashMap::new();
        for (partition, owner) in self.map.borrow().iter() {
            if owner.replica != self.me {
                others.entry(owner.clone()).or_default().push(*partition);
            }
        }
        others
    }

    /// Follows the announcements (for [`Self::standing`]).
    pub fn announcements(&self) -> watch::Receiver<HashMap<i32, Owner>> {
        self.map.subscribe()
    }

    /// The partitions this replica keeps warm for their owners: for each partition
    /// another replica announced, the `count` replicas other than its owner that
    /// score highest (rendezvous hashing of replica id and partition, over the
    /// replicas the announcements name) stand by. Every replica computes the same
    /// choice from the same announcements, and a replica joining or leaving moves
    /// only the standbys it scores highest for.
    pub fn standing(&self, count: usize) -> BTreeSet<i32> {
        let map = self.map.borrow();
        let owned = &self.assignment.borrow().partitions;
        map.keys()
            .copied()
            .filter(|p| stands_by(&self.me, &map, owned, count, *p))
            .collect()
    }

    /// Whether this replica stands by for `partition` (one partition of
    /// [`Self::standing`]).
    pub fn stands_by(&self, partition: i32, count: usize) -> bool {
        stands_by(
            &self.me,
            &self.map.borrow(),
            &self.assignment.borrow().partitions,
            count,
            partition,
        )
    }

    /// Tells the other replicas that this one serves `partition`.
    pub async fn announce(&self, partition: i32, addr: String) -> Result<(), EngineError> {
        self.publish(
            partition,
            &Notice::Owner {
                partition,
                owner: Owner {
                    replica: self.me.clone(),
                    addr,
                },
            },
        )
        .await
    }

    async fn publish(&self, partition: i32, notice: &Notice) -> Result<(), EngineError> {
        let payload = serde_json::to_vec(notice).map_err(|e| EngineError::Codec(e.to_string()))?;
        self.queue
            .publish(OutgoingRecord {
                topic: self.topic.clone(),
                key: Bytes::from(partition.to_string()),
                payload: Bytes::from(payload),
                headers: Vec::new(),
                partition: Some(0),
            })
            .await?;
        Ok(())
    }
}

/// Whether `me` stands by for `partition` (see [`Owners::standing`]), given the
/// announcements and the partitions `me` owns: one of the `count` replicas other
/// than the owner with the highest rendezvous score.
fn stands_by(
    me: &str,
    map: &HashMap<i32, Owner>,
    owned: &BTreeSet<i32>,
    count: usize,
    partition: i32,
) -> bool {
    let Some(owner) = map.get(&partition) else {
        return false;
    };
    if count == 0 || owner.replica == me || owned.contains(&partition) {
        return false;
    }
    let score = |replica: &str| mailmesh_types::fnv1a(format!("{replica}/{partition}").as_bytes());
    let mine = (score(me), me);
    let mut others: Vec<&str> = map
        .values()
        .map(|o| o.replica.as_str())
        .filter(|r| *r != owner.replica && *r != me)
        .collect();
    others.sort_unstable();
    others.dedup();
    // Replicas that outrank this one for the partition, the owner aside.
    others.iter().filter(|r| (score(r), **r) > mine).count() < count
}

/// Follows the owners log into the map.
async fn tail(
    owners: std::sync::Weak<Owners>,
    mut reader: Box<dyn mailmesh_queue::PartitionReader>,
) {
    loop {
        let record = match reader.recv().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "reading the partition owners' log; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(owners) = owners.upgrade() else {
            return;
        };
        match serde_json::from_slice::<Notice>(&record.payload) {
            Ok(Notice::Owner { partition, owner }) => {
                owners.map.send_modify(|m| {
                    m.insert(partition, owner);
                });
            }
            // Written by a newer version: skipped (hints only).
            Err(e) => {
                tracing::debug!(offset = record.offset, error = %e, "unreadable owners record")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announced(owners: &[(&str, &[i32])]) -> HashMap<i32, Owner> {
        owners
            .iter()
            .flat_map(|(replica, partitions)| {
                partitions.iter().map(move |p| {
                    (
                        *p,
                        Owner {
                            replica: (*replica).to_owned(),
                            addr: format!("{replica}:7001"),
                        },
                    )
                })
            })
            .collect()
    }

    fn standing(
        me: &str,
        map: &HashMap<i32, Owner>,
        owned: &BTreeSet<i32>,
        count: usize,
    ) -> BTreeSet<i32> {
        map.keys()
            .copied()
            .filter(|p| stands_by(me, map, owned, count, *p))
            .collect()
    }

    fn owned(partitions: &[i32]) -> BTreeSet<i32> {
        partitions.iter().copied().collect()
    }

    #[test]
    fn two_replicas_stand_by_for_each_other() {
        let map = announced(&[("a", &[0, 2]), ("b", &[1, 3])]);
        assert_eq!(standing("a", &map, &owned(&[0, 2]), 1), owned(&[1, 3]));
        assert_eq!(standing("b", &map, &owned(&[1, 3]), 1), owned(&[0, 2]));
        assert!(standing("a", &map, &owned(&[0, 2]), 0).is_empty());
    }

    #[test]
    fn every_partition_gets_as_many_standbys_as_asked_never_its_owner() {
        let replicas = ["r1", "r2", "r3", "r4"];
        let map = announced(&[
            ("r1", &[0, 4, 8, 12]),
            ("r2", &[1, 5, 9, 13]),
            ("r3", &[2, 6, 10, 14]),
            ("r4", &[3, 7, 11, 15]),
        ]);
        for count in 1..=3 {
            let mut standbys: HashMap<i32, Vec<&str>> = HashMap::new();
            for r in replicas {
                let mine: BTreeSet<i32> = map
                    .iter()
                    .filter(|(_, o)| o.replica == r)
                    .map(|(p, _)| *p)
                    .collect();
                for p in standing(r, &map, &mine, count) {
                    standbys.entry(p).or_default().push(r);
                }
            }
            for p in 0..16 {
                let got = standbys.get(&p).cloned().unwrap_or_default();
                assert_eq!(got.len(), count, "partition {p}: {got:?}");
                assert!(!got.contains(&map[&p].replica.as_str()));
            }
        }
        // Spread: with one standby, no replica keeps more than half the others'.
        let most = replicas
            .iter()
            .map(|r| {
                let mine = owned(&[]);
                standing(r, &map, &mine, 1)
                    .into_iter()
                    .filter(|p| map[p].replica != *r)
                    .count()
            })
            .max()
            .unwrap();
        assert!(most <= 8, "{most}");
    }
}
