//! [`Claim`]: a session's messages taken by a worker, given back to the front of their queue
//! if the worker unwinds before the broker acknowledged them.

use std::sync::Arc;

use ordo_core::envelope::WireMessage;

use super::{Dispatcher, Item, Sent};

/// A session's messages taken by a worker. Dropped before [`Claim::done`] (the worker panicked
/// or was abandoned), it puts the unsent messages back at the front of their queue.
pub(super) struct Claim {
    dispatcher: Arc<Dispatcher>,
    session: Option<String>,
    pub(super) messages: Vec<WireMessage>,
    sent: Vec<Sent>,
}

impl Claim {
    pub(super) fn new(dispatcher: Arc<Dispatcher>, session: String, items: Vec<Item>) -> Self {
        // The messages move out of their items (no copy per message); the rest of each item,
        // its permits included, stays until the broker acknowledged the batch.
        let (messages, sent) = items
            .into_iter()
            .map(|i| {
                (
                    i.message,
                    Sent {
                        seq: i.seq,
                        read_at: i.read_at,
                        _permits: i._permits,
                    },
                )
            })
            .unzip();
        Self {
            dispatcher,
            session: Some(session),
            messages,
            sent,
        }
    }

    pub(super) fn session(&self) -> &str {
        self.session.as_deref().unwrap_or_default()
    }

    /// Takes message `i` out of the claim (it was parked).
    pub(super) fn remove(&mut self, i: usize) -> Sent {
        self.messages.remove(i);
        self.sent.remove(i)
    }

    /// Everything left was sent: the session goes to the next worker.
    pub(super) fn done(mut self) -> Vec<Sent> {
        let sent = std::mem::take(&mut self.sent);
        self.messages.clear();
        if let Some(session) = self.session.take() {
            self.dispatcher.release(session);
        }
        sent
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let items = std::mem::take(&mut self.messages)
            .into_iter()
            .zip(std::mem::take(&mut self.sent))
            .map(|(message, s)| Item {
                seq: s.seq,
                message,
                read_at: s.read_at,
                _permits: s._permits,
            })
            .collect();
        self.dispatcher.requeue(session, items);
    }
}
