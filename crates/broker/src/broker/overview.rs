//! A read-only summary of every topic and subscription, across projects,
//! for the web dashboard: what each subscription still owes and how old
//! the oldest of it is.

use super::Broker;

/// One topic as the dashboard lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicSummary {
    /// `projects/P/topics/T`.
    pub name: String,
    pub subscriptions: usize,
}

/// One subscription as the dashboard lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionSummary {
    /// `projects/P/subscriptions/S`.
    pub name: String,
    /// The topic's full name, or `_deleted-topic_`.
    pub topic: String,
    /// Messages still owed (ready, leased, delayed, waiting).
    pub backlog: usize,
    /// Publish time (ns since the epoch) of the oldest unacked message.
    pub oldest_unacked_nanos: Option<i64>,
    pub push: bool,
}

impl Broker {
    /// Every topic and subscription, sorted by name. One pass under the
    /// broker lock; the oldest unacked message is the backlog's lowest seq
    /// (seqs are assigned in publish order).
    pub fn overview(&self) -> (Vec<TopicSummary>, Vec<SubscriptionSummary>) {
        let st = self.lock();
        let mut topics: Vec<TopicSummary> = st
            .catalog
            .topics
            .iter()
            .map(|(name, t)| TopicSummary {
                name: name.clone(),
                subscriptions: st.topic_subs.get(&t.uid).map_or(0, Vec::len),
            })
            .collect();
        topics.sort_by(|a, b| a.name.cmp(&b.name));
        let mut subs: Vec<SubscriptionSummary> = st
            .catalog
            .subscriptions
            .iter()
            .map(|(name, s)| {
                let rt = st.subs.get(&s.uid);
                SubscriptionSummary {
                    name: name.clone(),
                    topic: s.config.topic.clone(),
                    backlog: rt.map_or(0, |r| r.backlog.len()),
                    oldest_unacked_nanos: rt.and_then(|r| {
                        let seq = r.backlog.first_key()?;
                        r.backlog.get(&seq).map(|e| e.msg.publish_time_nanos())
                    }),
                    push: s.config.push_config.is_some(),
                }
            })
            .collect();
        subs.sort_by(|a, b| a.name.cmp(&b.name));
        (topics, subs)
    }
}
