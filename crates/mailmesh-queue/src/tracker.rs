//! Which offsets a consumer may store: per partition, the lowest offset received and
//! not yet done. Records may finish out of order (a delivery worker handles many at
//! once); the stored offset only ever covers a contiguous run of finished records, so
//! a crash re-delivers every record whose outcome was not durable.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

/// Called with (topic, partition, next offset to consume) when a partition's
/// contiguous done prefix grows.
pub(crate) type StoreOffset = Box<dyn Fn(&str, i32, i64) + Send + Sync>;

#[derive(Default)]
struct PartitionState {
    in_flight: BTreeSet<i64>,
    /// One past the highest offset received.
    next_received: i64,
    /// The next offset the group will consume after a restart.
    stored: Option<i64>,
}

pub(crate) struct OffsetTracker {
    partitions: Mutex<HashMap<(Arc<str>, i32), PartitionState>>,
    store: StoreOffset,
}

impl OffsetTracker {
    pub(crate) fn new(store: StoreOffset) -> Arc<Self> {
        Arc::new(Self {
            partitions: Mutex::new(HashMap::new()),
            store,
        })
    }

    /// Registers a received record and returns its acknowledgement handle.
    pub(crate) fn received(self: &Arc<Self>, topic: &str, partition: i32, offset: i64) -> Ack {
        let topic: Arc<str> = Arc::from(topic);
        let mut parts = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        let state = parts
            .entry((topic.clone(), partition))
            .or_insert_with(|| PartitionState {
                // The first record received is where the group's stored offset is.
                stored: Some(offset),
                ..PartitionState::default()
            });
        state.in_flight.insert(offset);
        state.next_received = state.next_received.max(offset + 1);
        Ack {
            tracker: Some(Arc::clone(self)),
            topic,
            partition,
            offset,
        }
    }

    fn done(&self, topic: &Arc<str>, partition: i32, offset: i64) {
        let mut parts = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        let Some(state) = parts.get_mut(&(topic.clone(), partition)) else {
            // The partition was revoked since; its new owner re-delivers the record.
            return;
        };
        if !state.in_flight.remove(&offset) {
            return;
        }
        let next = state
            .in_flight
            .first()
            .copied()
            .unwrap_or(state.next_received);
        if state.stored.is_none_or(|s| next > s) {
            state.stored = Some(next);
            (self.store)(topic, partition, next);
        }
    }

    /// Forgets partitions this consumer no longer owns.
    pub(crate) fn revoke(&self, topic: &str, partition: i32) {
        let mut parts = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        parts.retain(|(t, p), _| !(&**t == topic && *p == partition));
    }
}

/// Marks one consumed record's outcome durable. Dropping it without calling
/// [`Ack::done`] leaves the record to be delivered again.
pub struct Ack {
    tracker: Option<Arc<OffsetTracker>>,
    topic: Arc<str>,
    partition: i32,
    offset: i64,
}

impl Ack {
    /// Every outcome of the record (stored, relayed, retried or bounced) is durable.
    pub fn done(mut self) {
        if let Some(tracker) = self.tracker.take() {
            tracker.done(&self.topic, self.partition, self.offset);
        }
    }
}

impl fmt::Debug for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ack({}/{}@{})", self.topic, self.partition, self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (topic, partition, next offset) as the tracker stored them.
    type Stored = Arc<Mutex<Vec<(String, i32, i64)>>>;

    fn tracker() -> (Arc<OffsetTracker>, Stored) {
        let stored = Arc::new(Mutex::new(Vec::new()));
        let s = stored.clone();
        let tracker = OffsetTracker::new(Box::new(move |t, p, o| {
            s.lock().unwrap().push((t.to_owned(), p, o));
        }));
        (tracker, stored)
    }

    #[test]
    fn stores_only_the_contiguous_done_prefix() {
        let (t, stored) = tracker();
        let acks: Vec<Ack> = (10..15).map(|o| t.received("q", 0, o)).collect();
        let mut acks = acks.into_iter();
        let (a10, a11, a12, a13, a14) = (
            acks.next().unwrap(),
            acks.next().unwrap(),
            acks.next().unwrap(),
            acks.next().unwrap(),
            acks.next().unwrap(),
        );
        a12.done();
        a11.done();
        assert!(stored.lock().unwrap().is_empty(), "10 is still in flight");
        a10.done();
        assert_eq!(stored.lock().unwrap().as_slice(), [("q".into(), 0, 13)]);
        a14.done();
        assert_eq!(stored.lock().unwrap().len(), 1);
        a13.done();
        assert_eq!(stored.lock().unwrap().last().unwrap(), &("q".into(), 0, 15));
    }

    #[test]
    fn partitions_are_independent_and_dropped_acks_hold_the_offset() {
        let (t, stored) = tracker();
        let held = t.received("q", 0, 0);
        t.received("q", 1, 0).done();
        assert_eq!(stored.lock().unwrap().as_slice(), [("q".into(), 1, 1)]);
        drop(held);
        t.received("q", 0, 1).done();
        assert_eq!(stored.lock().unwrap().len(), 1, "offset 0 never finished");
    }

    #[test]
    fn revoked_partitions_store_nothing() {
        let (t, stored) = tracker();
        let ack = t.received("q", 0, 5);
        t.revoke("q", 0);
        ack.done();
        assert!(stored.lock().unwrap().is_empty());
    }
}
